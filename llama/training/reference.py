"""DPO's reference log-probabilities, without a second model in memory during training.

The reference (the starting checkpoint, or --reference CHECKPOINT) is run once, before the
first step, over every training and validation pair on the run's own mesh; the table of
its log-probabilities (chosen, rejected per pair) is kept on every rank and stored in
SAVE_DIR/reference/, under a key of the data, the reference's weights, --seq-len and
--dtype, so that a resume, or a new run on the same data and reference, reads it instead.
Under LoRA the reference is the base itself, the model with its adapters off: each batch's
rows are filled by one more forward (PreferenceLoss.before_forward), and no pass is made;
except under pipeline parallelism, whose schedule runs one forward per step, where the pass
is made with the adapters off.

The pass starts the policy itself when the run starts fresh from the reference; otherwise
(a resume without the stored table, or another reference) the reference is built on its
own, before the policy, and freed after the pass."""

import argparse
import gc
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from llama.config import ModelArgs
from llama.lora import adapters_off
from parallel.mesh import cp_mesh, pp_mesh

from .build import build_trainee
from .preference import DPOConfig, PreferenceLoss, ReferenceRecorder
from .step import Trainee, to_device

STORE_VERSION = 1


class ReferenceLogps:
    """(pairs + 1, 2) fp32 log-probabilities on the device, column 0 the chosen reply and 1
    the rejected one; the last row takes the padding pairs (pair id -1), whose losses count
    for nothing. Indexed by pair id without a host sync."""

    def __init__(self, pairs: int, device):
        self.pairs = pairs
        self.table = torch.zeros(pairs + 1, 2, device=device)

    def lookup(self, pair_ids: torch.Tensor) -> torch.Tensor:
        return self.table[pair_ids]

    def store(self, pair_ids: torch.Tensor, logps: torch.Tensor) -> None:
        self.table[pair_ids] = logps.to(self.table.dtype)


@dataclass
class ReferencePlan:
    """Where a DPO run's reference log-probabilities come from: `stored` (read from
    SAVE_DIR/reference/), a pass still to make with the policy at its start (`policy_pass`),
    or the LoRA base per batch (`adapters_off`)."""

    reference: ReferenceLogps
    key: str
    path: Path
    stored: bool = False
    policy_pass: bool = False
    adapters_off: bool = False


def reference_source(opts, args: ModelArgs):
    """What the reference's weights are read from: --reference, else the run's start."""
    return opts.reference or opts.checkpoint or args


def reference_key(opts, data) -> str:
    """sha256 of what the table depends on: the pairs (their caches' keys and the validation
    split), --seq-len (which pairs are dropped), the reference's weights and --dtype."""
    from llama.weights.peft import base_fingerprint, random_base_fingerprint

    source = opts.reference or opts.checkpoint
    weights = (base_fingerprint(Path(source)) if source is not None
               else random_base_fingerprint(ModelArgs.from_preset(opts.preset), opts.seed))
    record = {"version": STORE_VERSION, "pairs": data.pair_keys, "seq_len": opts.seq_len, "weights": weights,
              "dtype": opts.dtype, "val_fraction": opts.val_fraction, "seed": opts.seed if opts.val_fraction else None}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def plan_reference(opts, args: ModelArgs, mesh, data, save_dir: Path, device, resumed: bool) -> Optional[ReferencePlan]:
    """Before the policy is built (None unless --objective dpo): read the stored table, or
    decide how it is made. A pass that needs a model other than the policy's start runs
    here, the reference built on this mesh and freed after it, so that training never holds
    two models."""
    if opts.objective != "dpo":
        return None
    pairs = data.pair_count
    key = reference_key(opts, data)
    plan = ReferencePlan(ReferenceLogps(pairs, device), key, save_dir / "reference" / f"{key[:16]}.pt")
    under_lora = bool(opts.lora_rank) and opts.reference is None
    if under_lora and pp_mesh(mesh) is None:
        plan.adapters_off = True
        return plan
    if plan.path.is_file():
        stored = torch.load(plan.path, map_location="cpu", weights_only=True)
        if stored["key"] == key and stored["logps"].shape == (pairs, 2):
            plan.reference.table[:pairs] = stored["logps"].to(device)
            plan.stored = True
            say(f"reference log-probabilities of {pairs:,} pairs read from {plan.path}")
            return plan
    if not resumed and opts.reference in (None, opts.checkpoint):
        plan.policy_pass = True  # the policy is the reference until its first step
        return plan
    trainee = build_trainee(reference_source(opts, args), mesh, argparse.Namespace(**{**vars(opts), "lora_rank": 0,
                                                                                   "base_dtype": None}), init=True)
    reference_pass(trainee, data, plan, mesh)
    del trainee
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return plan


def build_objective(opts, trainee: Trainee, data, mesh, plan: Optional[ReferencePlan]):
    """The run's objective, after the policy is built and resumed: DPO with its reference
    (the pass with the policy at its start, if it is still to make), or the trainee's own
    next-token loss."""
    if opts.objective != "dpo":
        return trainee.objective
    if plan.policy_pass:
        with adapters_off(trainee.model):  # LoRA under pp: the base
            reference_pass(trainee, data, plan, mesh)
    return PreferenceLoss(DPOConfig.from_options(opts), plan.reference, trainee.cp, reference_forward=plan.adapters_off)


@torch.no_grad()
def reference_pass(trainee: Trainee, data, plan: ReferencePlan, mesh) -> None:
    """The reference's log-probabilities of every training and validation pair, on every
    rank, stored by rank 0. Each dp rank runs its share of the pairs; the ranks that hold a
    row's final value (the last pipeline stage's first tp and cp rank) add theirs into one
    all-reduce over the world, with a count of who wrote each row; the others add zeros."""
    reference, device = plan.reference, plan.reference.table.device
    batches = [*data.train_set.reference_batches(data.loader.dp_rank, data.loader.dp_size, data.loader.micro_batch),
               *data.validation]
    say(f"reference pass: {reference.pairs:,} pairs in {len(batches)} micro-batches per dp rank ...")
    objective, trainee.objective = trainee.objective, ReferenceRecorder(reference, trainee.cp)
    try:
        for batch in batches:
            trainee.loss_sum(to_device(batch, device))
    finally:
        trainee.objective = objective
    holds_values = mesh["tp"].get_local_rank() == 0 and (trainee.pipeline is None or trainee.pipeline.last)
    if cp_mesh(mesh) is not None:
        holds_values = holds_values and cp_mesh(mesh).get_local_rank() == 0
    # each row's values over the ranks that computed it (one, unless a pair is in two sets)
    written = torch.zeros(reference.pairs + 1, 1, device=device)
    if holds_values:
        for batch in batches:
            written[batch.pair_ids.to(device)] = 1
    else:
        reference.table.zero_()
    merged = torch.cat([reference.table, written], dim=1)
    dist.all_reduce(merged)
    reference.table.copy_(merged[:, :2] / merged[:, 2:].clamp(min=1))
    reference.table[-1] = 0  # the padding pairs' row
    if dist.get_rank() == 0:
        plan.path.parent.mkdir(parents=True, exist_ok=True)
        partial = plan.path.with_suffix(".partial")
        torch.save({"key": plan.key, "logps": reference.table[:-1].cpu()}, partial)
        os.replace(partial, plan.path)
    say(f"reference log-probabilities stored in {plan.path}")


def say(line: str) -> None:
    if dist.get_rank() == 0:
        print(line, flush=True)
