"""Validation: the mean loss (and the objective's metrics) over a fixed set of held-out batches, the same on any mesh,
and when a run computes it (every --eval-every steps and at the last step)."""

from typing import Optional

import torch
import torch.distributed as dist

from parallel.mesh import batch_mesh

from .step import Trainee, to_device


def evaluate(trainee: Trainee, batches: list, device, mesh) -> dict:
    """{"val_loss": the mean loss per target token (per pair under DPO), and the objective's
    metrics as val_<name>} over the fixed validation batches of every dp rank: the same on
    any mesh, as the set of samples does not depend on it."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, what it counts
    for batch in (to_device(b, device) for b in batches):
        loss, counted = trainee.loss_sum(batch)
        totals[0] += loss.double()
        totals[1] += counted
    metrics = trainee.objective.take_metrics()  # their sums over the same pairs
    totals = torch.cat([totals, torch.stack(list(metrics.values())).double()]) if metrics else totals
    group = batch_mesh(mesh)
    if group.size() > 1:
        dist.all_reduce(totals, group=group.get_group())
    means = (totals / totals[1].clamp(min=1)).tolist()
    return {"val_loss": means[0], **{f"val_{name}": value for name, value in zip(metrics, means[2:])}}


class Validation:
    """This rank's validation batches (none: no validation set) and their cadence."""

    def __init__(self, trainee: Trainee, batches: list, device, mesh, every: int, last_step: int):
        self.trainee, self.batches, self.device, self.mesh = trainee, batches, device, mesh
        self.every, self.last_step = every, last_step

    def __bool__(self) -> bool:
        return bool(self.batches)

    def run(self) -> dict:
        return evaluate(self.trainee, self.batches, self.device, self.mesh)

    def maybe_run(self, step: int) -> Optional[dict]:
        """The validation loss (and metrics) after `step` when it is due, else None."""
        if self.batches and (step % self.every == 0 or step == self.last_step):
            return self.run()
        return None
