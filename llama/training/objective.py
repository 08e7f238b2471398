"""What a step optimises. An objective says how a micro-batch's logits become a summed
loss, and what the step's mean divides by, so that the loop and the step never name it:

    targets(batch)               what the loss reads besides the logits (the pipeline's last
                                 stage gets only these, cut into its micro-batches)
    before_forward(model, batch) work before the forward (DPO under LoRA: the reference)
    summed(logits, targets)      the micro-batch's summed loss, over this rank's part
    step_divisor(loader)         what the step's mean divides the sums by, on every rank
    counted(batch)               what an evaluation's mean divides by
    take_metrics()               {name: summed value} of the metrics since the last call
    calls(), keep_calls(a, b)    how many summed() calls the metrics hold; keep the first a and
                                 the last b (the pipeline's own calls: see Trainee)

The default is next-token cross-entropy over the targets that are not -100, vocab-parallel
under tensor parallelism (the full-vocabulary logits are never gathered); DPO is in
llama/training/preference.py."""

import torch

from llama.data.loader import DistributedDataLoader
from llama.data.windows import Batch
from parallel.losses import vocab_parallel_cross_entropy


class Objective:
    """What every objective has unless it says otherwise: no work before the forward, no
    metrics beyond the loss."""

    def before_forward(self, model, batch: Batch) -> None:
        pass

    def take_metrics(self) -> dict:
        return {}

    def calls(self) -> int:
        return 0

    def keep_calls(self, first: int, last: int) -> None:
        pass


class NextTokenLoss(Objective):
    """Summed token cross-entropy; a step's mean divides by the step's target tokens over
    every dp rank and micro-step, so that the mean is the same on any mesh."""

    name = "cross_entropy"

    def step_divisor(self, loader: DistributedDataLoader) -> float:
        # every rank knows every sample's target count: no collective
        return max(loader.step_target_tokens(), 1)

    def targets(self, batch: Batch) -> torch.Tensor:
        return batch.targets

    def summed(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, reduction="sum")

    def counted(self, batch: Batch) -> torch.Tensor:
        """What an evaluation's mean divides by: the batch's target tokens."""
        return (batch.targets != -100).sum()
