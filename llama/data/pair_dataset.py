"""Preference pairs as batches: one sample is one pair, two rows of a micro-batch.

`PairDataset` serves whole pairs: a micro-batch of m pairs is 2m rows, row 2j the chosen
and row 2j + 1 the rejected sequence of its j-th pair, so the two always meet in one
forward (and one pipeline micro-batch, whose row count is even). Each row is one sequence
then padding, shifted by one as `ChatDataset`'s rows are; one pair of seq_len = 12:

    chosen    inputs   BOS h h u eot h h c c c      0 0    targets  . . . . . . c c c eot  . .
    rejected  inputs   BOS h h u eot h h r          0 0 0 0         . . . . . . r eot . . . .

("." = IGNORE_INDEX; h a header token, u the prompt, c / r the replies). The targets are
exactly the reply tokens SFT would train on, so a row's summed log-probability over its
targets is the response's. A pair longer than seq_len + 1 tokens is dropped and counted,
never truncated: a cut response has another log-probability. `Batch.pair_ids` names each
pair (its index among the kept pairs + id_offset; -1 for padding), for the reference
log-probabilities that `reference_batches` lets the objective compute once.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from llama.data.errors import DataError
from llama.data.pair_cache import PairCache
from llama.data.windows import IGNORE_INDEX, Batch, Row, WindowDataset, check_documents


class PairDataset(WindowDataset):
    """The pairs of `cache` (those `documents` selects, all by default) whose chosen and
    rejected sequences both have at most seq_len + 1 tokens, in a seeded order per epoch."""

    def __init__(self, cache: PairCache, seq_len: int, seed: int = 0, *, documents: np.ndarray | None = None,
                 id_offset: int = 0):
        super().__init__()
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.cache, self.seq_len, self.seed, self.id_offset = cache, seq_len, seed, id_offset
        self.name = cache.describe()
        offsets = cache.sequences.offsets
        pairs = (np.arange(cache.num_pairs) if documents is None
                 else check_documents(documents, cache.num_pairs, self.name))
        lengths = np.diff(offsets).reshape(-1, 2)[pairs]  # [pair, chosen / rejected]
        longest = lengths.max(axis=1)
        kept = longest <= seq_len + 1
        self.num_dropped = int((~kept).sum())
        if not kept.any():
            worst = int(np.argmax(longest))
            shortest, most = int(longest.min()), int(longest[worst])
            raise DataError(
                f"{self.name}: all {len(pairs):,} pairs are longer than --seq-len + 1 = {seq_len + 1} tokens (the "
                f"shortest has {shortest:,}; the longest, pair {int(pairs[worst])} of the cache, {most:,}), and a "
                f"pair is dropped, never truncated; raise --seq-len to at least {shortest - 1} (to keep every "
                f"pair, {most - 1})")
        self.pairs = pairs[kept]  # dataset index -> the cache's pair index
        self._lengths = lengths[kept]
        targets = np.add.reduceat(cache.sequences.mask, offsets[:-1], dtype=np.int64).reshape(-1, 2)
        self._targets = targets[self.pairs]  # [pair, chosen / rejected]: each sequence's label count
        self.num_samples = len(self.pairs)
        self.num_tokens = int(self._lengths.sum())  # both sequences of every kept pair

    def sequences(self, i: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """(chosen, rejected) (ids, labels) of kept pair i."""
        return self.cache.pair(int(self.pairs[i]))

    def row(self, window: int) -> Row:
        """Kept pair `window`'s two rows, chosen then rejected: inputs and targets [2, seq_len],
        no document ids (one sequence a row, then padding)."""
        inputs = np.zeros((2, self.seq_len), dtype=np.int64)
        targets = np.full((2, self.seq_len), IGNORE_INDEX, dtype=np.int64)
        for r, (ids, labels) in enumerate(self.sequences(window)):
            inputs[r, :len(ids) - 1] = ids[:-1]
            targets[r, :len(ids) - 1] = labels[1:]
        return inputs, targets, None

    def num_targets(self, sample: int) -> int:
        return int(self._targets[self.window_index(sample)].sum())

    def get_batch(self, first_sample: int, dp_rank: int, dp_size: int, micro_batch: int,
                  stop: Optional[int] = None) -> Batch:
        """dp rank `dp_rank`'s micro_batch pairs of the micro_batch * dp_size starting at global
        sample `first_sample`, as 2 * micro_batch rows (chosen, rejected, chosen, ...). Samples at
        or past `stop` (None: no end) are padding pairs: rows without targets, pair id -1."""
        self.check_layout(dp_rank, dp_size, micro_batch)
        first = first_sample + dp_rank * micro_batch
        return self.pair_batch([None if stop is not None and s >= stop else self.window_index(s)
                                for s in range(first, first + micro_batch)])

    def reference_batches(self, dp_rank: int, dp_size: int, micro_batch: int) -> Iterator[Batch]:
        """Every kept pair exactly once, in index order 0, 1, 2, ... (not the training order):
        this rank's micro-batches of global batches of micro_batch * dp_size pairs, the last
        padded with padding pairs (id -1). The one pass that computes reference log-probabilities."""
        self.check_layout(dp_rank, dp_size, micro_batch)
        per_step = micro_batch * dp_size
        for global_first in range(0, self.num_samples, per_step):
            first = global_first + dp_rank * micro_batch
            yield self.pair_batch([i if i < self.num_samples else None for i in range(first, first + micro_batch)])

    def pair_batch(self, pairs: Sequence[Optional[int]]) -> Batch:
        """The rows of kept pairs `pairs` (None: a padding pair), two rows each, and their pair ids."""
        rows = [self.padding_row() if i is None else self.row(i) for i in pairs]
        inputs, targets = (np.concatenate(column) for column in list(zip(*rows))[:2])
        pair_ids = np.array([-1 if i is None else i + self.id_offset for i in pairs], dtype=np.int64)
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), None, torch.from_numpy(pair_ids))

    def padding_row(self) -> Row:
        """A padding pair's two rows: inputs 0, no targets."""
        return (np.zeros((2, self.seq_len), dtype=np.int64), np.full((2, self.seq_len), IGNORE_INDEX, np.int64),
                None)

    def check_fits(self, global_batch: int) -> None:
        if self.num_samples < global_batch:
            raise DataError(
                f"{self.name}: {self.num_samples:,} pairs of at most --seq-len + 1 = {self.seq_len + 1} tokens "
                f"({self.num_dropped:,} dropped as longer), fewer than one global batch of {global_batch} pairs; "
                "add pairs, or raise --seq-len, or lower --global-batch")

    def summary(self, name: str) -> str:
        """One start-up line, e.g. "train: 1,234 pairs (12 dropped: longer than --seq-len + 1 = 513 tokens),
        345,678 tokens, 41.2% of the padded rows"."""
        dropped = (f" ({self.num_dropped:,} dropped: longer than --seq-len + 1 = {self.seq_len + 1} tokens)"
                   if self.num_dropped else "")
        # each sequence is padded to seq_len + 1: what share of the rows is real tokens (pairs
        # are not packed several to a row)
        filled = self.num_tokens / max(2 * self.num_samples * (self.seq_len + 1), 1)
        return f"{name}: {self.num_samples:,} pairs{dropped}, {self.num_tokens:,} tokens, {100 * filled:.1f}% of the padded rows"
