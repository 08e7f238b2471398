"""One optimizer step, and the state a run carries from step to step.

A step never waits for the device: its loss, gradient norm and skip flag stay device
tensors, read only on the steps that log or save (which wait anyway)."""

from dataclasses import dataclass, field
from typing import Optional

import torch

from llama.data.loader import DistributedDataLoader
from llama.data.windows import Batch
from parallel.context import split_for_cp
from parallel.layers import sum_adapter_gradients
from parallel.pipeline import Pipeline
from parallel.train_utils import clip_grad_norm_

from .objective import NextTokenLoss, Objective

NONFINITE_EXIT_CODE = 4  # --max-skips consecutive non-finite steps; the newest checkpoint predates them


@dataclass
class Trainee:
    """What the loop trains. `model` is the Transformer, or this rank's pipeline stages as
    one module (parallel.pipeline.RankStages: what the optimizer, clipping and checkpoints
    take) run by `pipeline`; `cp` is the mesh that splits each sequence (None: no context
    parallelism); `objective` turns logits into the loss."""

    model: torch.nn.Module
    pipeline: Optional[Pipeline] = None
    cp: object = None
    objective: Objective = field(default_factory=NextTokenLoss)  # or preference.PreferenceLoss

    def split(self, batch: Batch) -> Batch:
        """This cp rank's part of every sequence (the loader gives whole sequences)."""
        if self.cp is None:
            return batch
        inputs, targets, document_ids = (None if t is None else split_for_cp(t, self.cp) for t in batch[:3])
        return batch._replace(inputs=inputs, targets=targets, document_ids=document_ids)

    def loss_share(self, batch: Batch, step_divisor: float) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its summed loss over
        `step_divisor` (0 on pipeline ranks without the last stage)."""
        batch = self.split(batch)
        targets = self.objective.targets(batch)
        if self.pipeline is not None:
            return self._pipeline_run(self.pipeline.step, batch, targets, step_divisor)
        self.objective.before_forward(self.model, batch)
        logits = self.model(batch.inputs, document_ids=batch.document_ids)
        loss = self.objective.summed(logits, targets) / step_divisor
        loss.backward()
        return loss.detach()

    @torch.no_grad()
    def loss_sum(self, batch: Batch) -> tuple:
        """(summed loss, what it counts) of a batch, forward only, on this rank's part of
        it; both 0 on pipeline ranks without the last stage."""
        batch = self.split(batch)
        targets = self.objective.targets(batch)
        if self.pipeline is not None:
            loss = self._pipeline_run(self.pipeline.eval_loss_sum, batch, targets)
            if not self.pipeline.last:
                return loss, 0
        else:
            self.objective.before_forward(self.model, batch)
            loss = self.objective.summed(self.model(batch.inputs, document_ids=batch.document_ids), targets)
        return loss, self.objective.counted(batch)

    def _pipeline_run(self, run, batch: Batch, targets: torch.Tensor, *divisor) -> torch.Tensor:
        """The schedule's run of a batch with the objective as its loss. On its first run
        torch's pipelining calls the loss once more, to infer the gradients' shapes, before
        the micro-batches' own calls: their metrics alone are kept."""
        self.pipeline.loss.summed = self.objective.summed
        before = self.objective.calls()
        loss = run(batch.inputs, targets, batch.document_ids, *divisor)
        self.objective.keep_calls(before, self.pipeline.microbatches if self.pipeline.last else 0)
        return loss


def train_step(trainee: Trainee, optimizer, loader: DistributedDataLoader, device, clip: float, poison: bool = False):
    """One optimizer step over the loader's next global batch. Returns this rank's shares of
    the step's means, {"loss": ..., and the objective's metrics} (the shares add up over pp,
    dp and cp ranks), the gradient norm, and whether the update was skipped for a
    non-finite gradient norm (1.0) or not (0.0), all as device tensors: nothing here waits
    for the device, so read them only on log steps. poison: tests make this rank's loss NaN."""
    loss_sum = torch.zeros((), device=device)
    # what the whole step's mean divides by, over every dp rank and micro-step: each rank's
    # summed loss over it is its share of the step's mean, whatever the mesh
    step_divisor = trainee.objective.step_divisor(loader)
    if poison:  # every loss this rank computes, and so every gradient, becomes NaN
        step_divisor = float("nan")
    batch = to_device(next(loader), device)
    for micro in range(loader.grad_accum):
        # one batch of prefetch: the host builds and queues the next micro-batch while the
        # device runs this forward. Not across steps, so that the loader's position at a
        # step boundary (checkpoints, step_target_tokens) is exact; the host runs ahead
        # into the next step anyway, as a step that does not log never waits for the device.
        last = micro + 1 == loader.grad_accum
        upcoming = None if last else to_device(next(loader), device)
        loss_sum += trainee.loss_share(batch, step_divisor)
        batch = upcoming
    shares = {"loss": loss_sum, **{name: value / step_divisor for name, value in trainee.objective.take_metrics().items()}}
    sum_adapter_gradients(trainee.model)  # LoRA under tp: the replicated factors' shares, once a step
    grad_norm = clip_grad_norm_(trainee.model, clip if clip > 0 else None)
    # A non-finite loss on any rank makes the global grad norm non-finite on every rank, so
    # all ranks skip alike. The fused AdamW skips on the device (found_inf, as under
    # GradScaler), without a sync; another optimizer has to read the flag.
    skipped = (~torch.isfinite(grad_norm)).to(torch.float32)
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skipped
        optimizer.step()
    elif not skipped.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return shares, grad_norm, skipped


def to_device(batch: Batch, device) -> Batch:
    """The batch's tensors on `device`, copied without blocking the host: from pinned
    memory on CUDA (a copy from pageable memory makes the host wait for it)."""
    device = torch.device(device)

    def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None or t.device == device:
            return t
        if device.type == "cuda":
            t = t.pin_memory()  # the caching host allocator keeps it alive until the copy ends
        return t.to(device, non_blocking=True)

    return Batch(*(move(t) for t in batch))


class SkippedSteps:
    """Steps whose update was skipped for a non-finite loss or gradient norm: in all, and
    in a row. Kept on the device; `in_a_row()` and `total()` read it, so call them only on
    steps that wait for the device anyway."""

    def __init__(self, device, before: int = 0):
        self.all = torch.full((), float(before), device=device)
        self.row = torch.zeros((), device=device)

    def add(self, skipped: torch.Tensor) -> None:
        self.all += skipped
        self.row = (self.row + 1) * skipped

    def in_a_row(self) -> int:
        return int(self.row.item())

    def total(self) -> int:
        return int(self.all.item())


@dataclass
class TrainState:
    """What a checkpoint saves and a resume restores: the weights, the optimizer, the data
    position, the step and the skipped-step count (`args`, the run's flags, go along for
    the record)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: DistributedDataLoader
    skipped: SkippedSteps
    args: dict
    step: int = 0

    def advance(self, skipped: torch.Tensor) -> int:
        self.step += 1
        self.skipped.add(skipped)
        return self.step

    def trainer_state(self) -> dict:
        """The loop's part of a checkpoint (trainer.json; the step is added by the checkpointer)."""
        return {"data": self.loader.state_dict(), "args": self.args, "skipped_steps": self.skipped.total()}

    def restore(self, trainer: dict) -> None:
        self.loader.load_state_dict(trainer["data"])
        self.step = trainer["step"]
        self.skipped = SkippedSteps(self.skipped.all.device, trainer.get("skipped_steps", 0))
