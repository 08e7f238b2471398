"""What a step optimises. An objective says how a micro-batch's logits become a summed
loss, and what the step's mean divides by, so that the loop and the step never name it.

The default, and today the only one, is next-token cross-entropy over the targets that
are not -100, vocab-parallel under tensor parallelism (the full-vocabulary logits are
never gathered)."""

import torch

from llama.data.loader import DistributedDataLoader
from llama.data.windows import Batch
from parallel.layers import vocab_parallel_cross_entropy


class NextTokenLoss:
    """Summed token cross-entropy; a step's mean divides by the step's target tokens over
    every dp rank and micro-step, so that the mean is the same on any mesh."""

    name = "cross_entropy"

    def step_divisor(self, loader: DistributedDataLoader) -> float:
        # every rank knows every sample's target count: no collective
        return max(loader.step_target_tokens(), 1)

    def summed(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, batch.targets, reduction="sum")

    def counted(self, batch: Batch) -> torch.Tensor:
        """What an evaluation's mean divides by: the batch's target tokens."""
        return (batch.targets != -100).sum()
