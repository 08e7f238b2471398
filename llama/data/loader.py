"""Data-parallel batches: the loader, its global sample counter, and the validation split.

The data position is one global sample counter. A micro-step consumes
micro_batch * dp_size consecutive samples and dp rank r takes the r-th slice of
micro_batch. After optimizer step s with global batch
B = micro_batch * dp_size * grad_accum exactly s * B samples are consumed,
whatever dp_size was, so a run can resume on another number of dp ranks without
skipping or repeating a sample. Batches depend only on the dp rank: all
tensor-parallel ranks of one dp group get identical batches.
`step_target_tokens()` counts the targets of the next optimizer step on every
rank without a collective.

Validation: `split_documents` holds out whole documents, and `eval_batches`
yields the same fixed samples on any mesh, the last batch padded with ignored
rows when the set does not fill it.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from llama.data.errors import DataError, log_on_rank0
from llama.data.windows import Batch, WindowDataset


def micro_batch_size(global_batch: int, dp_size: int, grad_accum: int = 1) -> int:
    """Samples per rank per micro-step: global_batch / (dp_size * grad_accum)."""
    if global_batch < 1 or dp_size < 1 or grad_accum < 1:
        raise DataError(f"global batch {global_batch}, dp_size {dp_size} and grad_accum {grad_accum} "
                        "must all be >= 1")
    per_step = dp_size * grad_accum
    if global_batch % per_step:
        lower, upper = global_batch // per_step * per_step, (global_batch // per_step + 1) * per_step
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise DataError(f"global batch {global_batch} is not divisible by dp_size {dp_size} x "
                        f"grad_accum {grad_accum} = {per_step}: use a global batch of {nearest}")
    return global_batch // per_step



class DistributedDataLoader:
    """One dp rank's endless stream of micro-batches; its state is the global
    sample counter, identical on every rank, so any rank's state_dict resumes all.

    Each `next()` is one micro-step: the global counter advances by
    micro_batch * dp_size; grad_accum micro-steps make one optimizer step of
    `global_batch` samples.
    """

    def __init__(self, dataset: WindowDataset, *, global_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, grad_accum: int = 1):
        self.dataset = dataset
        self.micro_batch = micro_batch_size(global_batch, dp_size, grad_accum)
        dataset.check_layout(dp_rank, dp_size, self.micro_batch)
        dataset.check_fits(global_batch)
        self.global_batch, self.grad_accum = global_batch, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.sample = 0  # global samples consumed so far

    @property
    def epoch(self) -> int:
        return self.sample // self.dataset.num_samples

    def __iter__(self) -> "DistributedDataLoader":
        return self

    def __next__(self) -> Batch:
        batch = self.dataset.get_batch(self.sample, self.dp_rank, self.dp_size, self.micro_batch)
        self.sample += self.micro_batch * self.dp_size
        return batch

    def step_target_tokens(self) -> int:
        """Targets the loss applies to in the next optimizer step, over all dp
        ranks and micro-steps: the divisor of an exact mean loss. Every rank
        knows every sample's count, so no collective is needed."""
        return sum(self.dataset.num_targets(s) for s in range(self.sample, self.sample + self.global_batch))

    def state_dict(self) -> dict:
        d = self.dataset
        return {"sample": self.sample, "seq_len": d.seq_len, "seed": d.seed, "num_samples": d.num_samples}

    def load_state_dict(self, state: dict) -> None:
        d = self.dataset
        saved = (state["seq_len"], state["seed"], state["num_samples"])
        if saved != (d.seq_len, d.seed, d.num_samples):
            raise DataError(
                f"checkpoint data state has seq_len={saved[0]}, seed={saved[1]}, {saved[2]} windows; this run "
                f"has seq_len={d.seq_len}, seed={d.seed}, {d.num_samples} windows of {d.name}: resume with "
                "the same data, seq_len and seed, or drop the data state to restart the data order")
        self.sample = int(state["sample"])


# ---------------------------------------------------------------------------
# Validation


def split_documents(num_docs: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted document indices: ceil(fraction * num_docs) whole
    documents held out at random, the same for a given seed on any mesh."""
    if not 0 < fraction < 1:
        raise DataError(f"validation fraction must be between 0 and 1 (exclusive), got {fraction}")
    num_val = int(np.ceil(fraction * num_docs))
    if num_docs < 2 or num_val >= num_docs:
        raise DataError(f"validation fraction {fraction} of {num_docs} documents leaves no document "
                        "to train on; lower the fraction or add documents")
    # Its own stream: the window orders use SeedSequence([seed, epoch]).
    order = np.random.default_rng([seed, 0x5EED]).permutation(num_docs)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def eval_windows(num_windows: int, num_batches: int, global_batch: int) -> int:
    """The real windows in the fixed validation set: every window of the set, up to
    num_batches global batches."""
    return min(num_windows, num_batches * global_batch)


def eval_batches(dataset: WindowDataset, num_batches: int, global_batch: int, dp_rank: int,
                 dp_size: int, micro_batch: int) -> Iterator[Batch]:
    """This rank's micro-batches over a fixed set of samples: the first
    `eval_windows(...)` samples of epoch 0's order, i.e. all of a set smaller than
    num_batches global batches. A last global batch they do not fill is padded with
    rows the loss ignores (`WindowDataset.padding_row`: no targets), so that every dp
    rank and micro-step gets a full micro-batch, as the mesh (pp microbatches, cp and
    sequence-parallel splits) needs. The set does not depend on the mesh, so the summed
    loss over it, divided by its target count, is the same on any."""
    dataset.check_layout(dp_rank, dp_size, micro_batch)
    if num_batches < 1:
        raise DataError(f"eval batches must be >= 1, got {num_batches}")
    if dataset.num_samples < 1:
        raise DataError(f"{dataset.name}: validation set has no windows; hold out more data")
    per_micro_step = micro_batch * dp_size
    if global_batch % per_micro_step:
        raise DataError(f"eval global batch {global_batch} is not a multiple of micro_batch {micro_batch} x "
                        f"dp_size {dp_size}")
    real = eval_windows(dataset.num_samples, num_batches, global_batch)
    batches = -(-real // global_batch)
    if real < num_batches * global_batch:
        padded = batches * global_batch - real
        log_on_rank0(
            f"warning: {dataset.name}: validation set has {real} windows, fewer than --eval-batches {num_batches} "
            f"x global batch {global_batch}; evaluating all {real} in {_count(batches, 'global batch', 'es')}"
            + (f", the last padded with {_count(padded, 'row')} the loss ignores" if padded else ""))
    for first in range(0, batches * global_batch, per_micro_step):
        yield dataset.get_batch(first, dp_rank, dp_size, micro_batch, stop=real)


def _count(n: int, noun: str, plural: str = "s") -> str:
    return f"{n} {noun}{plural if n != 1 else ''}"
