"""Preference tuning: DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) as an objective.

A micro-batch of preference pairs has two rows per pair (llama.data.pair_dataset): row 2j
the prompt and chosen reply, row 2j + 1 the prompt and rejected reply, with targets only on
the reply's tokens, exactly those SFT with --train-on last trains on. A reply's
log-probability is the sum of its target tokens' log-probabilities: minus their
cross-entropy, vocab-parallel under tensor parallelism (the vocabulary is never gathered),
summed over context-parallel ranks (each holds part of every sequence).

Per pair, with pi / ref the policy's / reference's log-probabilities of the chosen (c) and
rejected (r) reply, and h = (pi_c - ref_c) - (pi_r - ref_r):

    sigmoid (DPO)   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: cDPO's label smoothing)
    ipo             (h' - 1 / (2 beta))^2, h' the same difference of per-token means

Rewards are beta (pi_x - ref_x); accuracy is the fraction of pairs whose chosen reward is
above the rejected one (a tie is not a win). A step's loss and metrics are means over the
step's pairs on every dp rank and micro-step: each micro-batch's sums over its real pairs
(a validation batch's padding pairs, pair id -1, count for nothing) over the step's pair
count, so they are the same on any mesh.

The reference's log-probabilities come from a `ReferenceLogps` table indexed by pair id
(llama/training/reference.py): stored from one pass before the first step, or, under
LoRA, filled per batch by a forward with the adapters off."""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from llama.data.loader import DistributedDataLoader
from llama.data.windows import IGNORE_INDEX, Batch
from llama.lora import adapters_off
from parallel.context import cp_size, sum_over_cp
from parallel.losses import vocab_parallel_cross_entropy

from .objective import Objective

DPO_LOSSES = ("sigmoid", "ipo")
PAIR_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"--dpo-beta must be > 0, got {self.beta}")
        if self.loss not in DPO_LOSSES:
            raise ValueError(f"--dpo-loss must be one of {', '.join(DPO_LOSSES)}, got {self.loss!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--dpo-label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError("--dpo-label-smoothing applies to --dpo-loss sigmoid only")

    @classmethod
    def from_options(cls, opts) -> "DPOConfig":
        return cls(opts.dpo_beta, opts.dpo_loss, opts.dpo_label_smoothing)


def with_pair_ids(targets: torch.Tensor, pair_ids: torch.Tensor) -> torch.Tensor:
    """targets with each row's pair id as one more column. The pipeline hands its loss only
    the target rows of each of its micro-batches, so the pair ids travel inside them."""
    return torch.cat([targets, pair_ids.repeat_interleave(2).unsqueeze(1).to(targets.dtype)], dim=1)


def sequence_logps(logits, targets: torch.Tensor, cp_mesh=None) -> tuple:
    """(log-probability, target count) of each row: the sums over its targets, over every
    cp rank's part of the row. Differentiable in the logits."""
    token_losses = vocab_parallel_cross_entropy(logits, targets, reduction="none")
    logps = sum_over_cp(-token_losses.sum(-1), cp_mesh)
    counts = sum_over_cp((targets != IGNORE_INDEX).sum(-1).to(logps.dtype), cp_mesh)
    return logps, counts


def pair_losses(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, config: DPOConfig) -> tuple:
    """(loss, chosen reward, rejected reward) per pair, from (pairs, 2) log-probabilities and
    target counts, column 0 the chosen reply and 1 the rejected one."""
    rewards = config.beta * (policy - reference)
    if config.loss == "ipo":
        means = (policy - reference) / counts.clamp(min=1)
        losses = (means[:, 0] - means[:, 1] - 1 / (2 * config.beta)) ** 2
    else:
        h = rewards[:, 0] - rewards[:, 1]
        eps = config.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    return losses, rewards[:, 0], rewards[:, 1]


class PreferenceLoss(Objective):
    """The DPO objective (see the module docstring). `reference` is the table of the
    reference's log-probabilities; `reference_forward` (under LoRA) fills each batch's rows
    of it with a forward of the model with its adapters off, instead of a stored pass."""

    name = "dpo"
    metric_names = ("loss",) + PAIR_METRICS

    def __init__(self, config: DPOConfig, reference, cp_mesh=None, reference_forward: bool = False):
        self.config, self.reference, self.cp_mesh = config, reference, cp_mesh
        self.reference_forward = reference_forward
        self._calls: list = []  # each summed() call's metric sums since the last take_metrics

    def step_divisor(self, loader: DistributedDataLoader) -> float:
        return loader.global_batch  # pairs: every training pair is real

    def targets(self, batch: Batch) -> torch.Tensor:
        return with_pair_ids(batch.targets, batch.pair_ids)

    def before_forward(self, model, batch: Batch) -> None:
        """Under LoRA: the batch's reference log-probabilities, from the base (adapters off)."""
        if self.reference_forward:
            with torch.no_grad(), adapters_off(model):
                logits = model(batch.inputs, document_ids=batch.document_ids)
            record_reference(self.reference, logits, self.targets(batch), self.cp_mesh)

    def summed(self, logits, targets: torch.Tensor) -> torch.Tensor:
        """The micro-batch's summed pair losses over 1/cp of this rank's share (every cp rank
        computes the same losses); adds its metrics' sums for take_metrics."""
        targets, pair_ids = targets[:, :-1], targets[::2, -1]
        logps, counts = sequence_logps(logits, targets, self.cp_mesh)
        real = pair_ids >= 0
        reference = self.reference.lookup(pair_ids)
        losses, chosen, rejected = pair_losses(logps.view(-1, 2), reference, counts.view(-1, 2), self.config)
        share = real.to(losses.dtype) / cp_size(self.cp_mesh)
        with torch.no_grad():
            self._calls.append(torch.stack([chosen, rejected, chosen - rejected, (chosen > rejected).to(chosen.dtype)]) @ share)
        return (losses * share).sum()

    def counted(self, batch: Batch) -> torch.Tensor:
        """What an evaluation's mean divides by: the batch's real pairs, 1/cp of them on each
        cp rank (which all hold every pair, in part)."""
        return (batch.pair_ids >= 0).sum() / cp_size(self.cp_mesh)

    def take_metrics(self) -> dict:
        """{metric: sum} over the pairs since the last call (this rank's share), and reset.
        Every rank has every metric, 0 where it computed none (pipeline ranks without the
        last stage), as the log sums them over ranks in one collective."""
        calls, self._calls = self._calls, []
        sums = torch.stack(calls).sum(0) if calls else torch.zeros(len(PAIR_METRICS), device=self.reference.table.device)
        return dict(zip(PAIR_METRICS, sums))

    def calls(self) -> int:
        return len(self._calls)

    def keep_calls(self, first: int, last: int) -> None:
        """Forget the calls after the first `first` but the last `last`: torch's pipelining
        calls the loss once more on its first run, to infer the gradients' shapes."""
        self._calls = self._calls[:first] + (self._calls[len(self._calls) - last:] if last else [])


def record_reference(reference, logits, targets: torch.Tensor, cp_mesh=None) -> None:
    """Write a batch's log-probabilities into the reference table, at its real pairs."""
    targets, pair_ids = targets[:, :-1], targets[::2, -1]
    logps, _ = sequence_logps(logits, targets, cp_mesh)
    reference.store(pair_ids, logps.detach().view(-1, 2))


class ReferenceRecorder(Objective):
    """An objective for the reference pass: a forward's log-probabilities go into the table
    instead of into a loss (it returns 0 and counts nothing)."""

    name = "dpo-reference"

    def __init__(self, reference, cp_mesh=None):
        self.reference, self.cp_mesh = reference, cp_mesh

    targets = PreferenceLoss.targets

    def summed(self, logits, targets: torch.Tensor) -> torch.Tensor:
        record_reference(self.reference, logits, targets, self.cp_mesh)
        return torch.zeros((), device=targets.device)

    def counted(self, batch: Batch) -> torch.Tensor:
        return torch.zeros((), dtype=torch.int64)
