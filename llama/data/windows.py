"""Windows of seq_len + 1 tokens in a seeded order per epoch: what the loader needs of a dataset.

A dataset (`PackedDataset` for pretraining, `ChatDataset` for conversations)
cuts its data into windows and builds one window's row; `WindowDataset` visits
them in a seeded random order, a fresh permutation per epoch
(`Permutation(num_windows, seed, epoch)`, computed per lookup in O(1) memory),
and slices a dp rank's micro-batch out of consecutive global samples.
A batch is `Batch(inputs, targets, document_ids, pair_ids)`; targets are IGNORE_INDEX
where the loss does not apply (chat data only); pair_ids name the preference pairs
of a `PairDataset` batch (llama/data/pair_dataset.py) and are None elsewhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch

from llama.data.errors import DataError

IGNORE_INDEX = -100  # a target the loss skips (torch.nn.functional.cross_entropy's default)


class Batch(NamedTuple):
    """One rank's micro-batch, int64 [micro_batch, seq_len] tensors."""

    inputs: torch.Tensor
    targets: torch.Tensor  # IGNORE_INDEX where the loss does not apply
    document_ids: Optional[torch.Tensor]  # non-decreasing per row from 0; None without document masking
    pair_ids: Optional[torch.Tensor] = None  # preference data: int64 [micro_batch], rows 2j and 2j + 1 are
    #                                          pair pair_ids[j] (-1: a padding pair); None for other data


Row = tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]  # one sample's inputs, targets, document ids


_MASK64 = (1 << 64) - 1


class Permutation:
    """A seeded pseudo-random permutation of range(n), evaluated one index at a time
    in O(1) memory, so the order of 10**12 windows costs what the order of 10 does.

    A balanced Feistel network over the smallest even number of bits covering n is a
    bijection of [0, 4**k) whatever its round function (here splitmix64's finalizer of
    the right half xor a round key). An index that lands at or past n goes through the
    network again ("cycle walking") until it lands inside, which keeps the map a
    bijection of [0, n); the domain is under 4n, so a lookup averages under 4 passes
    (3-15 us in Python). The round keys come from numpy's SeedSequence of (seed, epoch):
    every rank derives the same order, and (seed, epoch) pairs do not collide as
    seed + epoch would.
    """

    ROUNDS = 6  # 4 already make a good pseudo-random permutation (Luby-Rackoff); 2 more are cheap

    def __init__(self, n: int, seed: int, epoch: int = 0):
        if n < 1:
            raise DataError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        self.half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)  # bits per Feistel half
        self.keys = [int(k) for k in np.random.SeedSequence([seed, epoch]).generate_state(self.ROUNDS, np.uint64)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} is outside the permutation of range({self.n})")
        i = self._encrypt(i)
        while i >= self.n:
            i = self._encrypt(i)
        return i

    def _encrypt(self, x: int) -> int:
        half, mask = self.half, (1 << self.half) - 1
        left, right = x >> half, x & mask
        for key in self.keys:  # the finalizer inlined: this loop is the per-sample cost
            z = ((right ^ key) + 0x9E3779B97F4A7C15) & _MASK64
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
            left, right = right, left ^ ((z ^ (z >> 31)) & mask)
        return (left << half) | right


class WindowDataset(ABC):
    """Windows of seq_len + 1 tokens in a seeded order per epoch: what the loader needs.

    Sample g (a global sample index, counting across epochs) is window
    Permutation(num_samples, seed, epoch)[g % num_samples] of epoch g // num_samples:
    every window once per epoch, the same order on every rank, in O(1) memory.
    Subclasses set seq_len, seed, name and num_samples and build one window's row.
    """

    seq_len: int
    seed: int
    name: str
    num_samples: int  # windows per epoch

    def __init__(self):
        self._orders: dict[int, Permutation] = {}  # epoch -> window order

    @abstractmethod
    def row(self, window: int) -> Row:
        """(inputs, targets, document ids or None) of one window, each [seq_len]."""

    @abstractmethod
    def num_targets(self, sample: int) -> int:
        """Targets the loss applies to in global sample `sample` (not IGNORE_INDEX); O(1)."""

    def window_index(self, sample: int) -> int:
        """Which window (of its epoch) global sample `sample` is."""
        epoch, i = divmod(sample, self.num_samples)
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # only the current and next epoch are ever needed
                self._orders.pop(min(self._orders))
            self._orders[epoch] = Permutation(self.num_samples, self.seed, epoch)
        return self._orders[epoch][i]

    def get_batch(self, first_sample: int, dp_rank: int, dp_size: int, micro_batch: int,
                  stop: Optional[int] = None) -> Batch:
        """dp rank `dp_rank`'s slice of the micro_batch * dp_size samples starting
        at global sample `first_sample`. Samples at or past `stop` (None: no end)
        are padding rows the loss ignores (`padding_row`), so that a set of samples
        that does not fill the last batch still gives every rank a full micro-batch."""
        self.check_layout(dp_rank, dp_size, micro_batch)
        first = first_sample + dp_rank * micro_batch
        return self._batch([first + j for j in range(micro_batch)], stop)

    def padding_row(self) -> Row:
        """A row without targets: inputs 0 (a valid id in any vocabulary), targets all
        IGNORE_INDEX, document ids all 0 (one document: a valid non-decreasing row) when
        the dataset's rows carry document ids. The loss and its target count skip it."""
        inputs, targets, doc_ids = self.row(0)  # the shapes, and whether rows carry ids
        return (np.zeros_like(inputs), np.full_like(targets, IGNORE_INDEX),
                None if doc_ids is None else np.zeros_like(doc_ids))

    def _batch(self, samples: Sequence[int], stop: Optional[int] = None) -> Batch:
        padding = self.padding_row() if stop is not None and samples[-1] >= stop else None
        rows = [padding if stop is not None and s >= stop else self.row(self.window_index(s)) for s in samples]
        inputs, targets, doc_ids = (np.stack(column) if column[0] is not None else None
                                    for column in zip(*rows))
        return Batch(*(torch.from_numpy(a.astype(np.int64)) if a is not None else None
                       for a in (inputs, targets, doc_ids)))

    def batches(self, dp_rank: int, dp_size: int, micro_batch: int,
                start_sample: int = 0) -> Iterator[Batch]:
        """Endless micro-batches for one dp rank, from global sample `start_sample` on."""
        self.check_layout(dp_rank, dp_size, micro_batch)
        self.check_fits(micro_batch * dp_size)
        if start_sample < 0:
            raise DataError(f"start_sample must be >= 0, got {start_sample}")
        sample = start_sample
        while True:
            yield self.get_batch(sample, dp_rank, dp_size, micro_batch)
            sample += micro_batch * dp_size

    def check_fits(self, global_batch: int) -> None:
        if self.num_samples < global_batch:
            raise DataError(
                f"{self.name}: corpus has {self.num_samples:,} windows of seq_len + 1 = {self.seq_len + 1} "
                f"tokens ({self.num_tokens:,} tokens), fewer than one global batch of {global_batch}; "
                "add text, or lower seq_len or the batch size")

    @staticmethod
    def check_layout(dp_rank: int, dp_size: int, micro_batch: int) -> None:
        """DataError unless dp_rank is one of dp_size ranks and micro_batch is >= 1."""
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside 0..dp_size-1 for dp_size {dp_size}")
        if micro_batch < 1:
            raise DataError(f"micro_batch must be >= 1, got {micro_batch}")


def check_documents(documents, num_docs: int, name: str) -> np.ndarray:
    """A `documents=` selection as an int64 index array, checked against the corpus's num_docs."""
    documents = np.asarray(documents, dtype=np.int64)
    if documents.ndim != 1 or len(documents) == 0:
        raise DataError(f"{name}: documents= must be a non-empty 1-D index array, got shape {documents.shape}")
    if documents.min() < 0 or documents.max() >= num_docs:
        raise DataError(f"{name}: documents= holds indices outside 0..{num_docs - 1}; "
                        "build the index from this corpus's own document count")
    return documents

