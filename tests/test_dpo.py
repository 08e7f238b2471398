"""DPO (llama/training/preference.py, reference.py): a step's loss, rewards and update equal an
independent oracle on one device, 2x2, pp 2 and cp 2; the reference pass gives the oracle's
log-probabilities on every mesh; the LoRA base as reference (adapters off, per batch) gives
the stored reference's numbers; at the start, with the policy as its own reference, the
validation loss is log 2.

The oracle is written with torch alone around a plain single-device Transformer: logits,
torch.nn.functional.log_softmax, the targets' log-probabilities summed per sequence, and the
closed forms of REFERENCE.md (DPO's -log sigmoid(beta h), IPO's squared error, cDPO's
smoothing), averaged over the step's pairs; torch's clip_grad_norm_ and AdamW. The reference
of the step tests is another model (seed 1), so that the losses start away from log 2.

One 4-rank gloo launch runs every mesh with train.py's own step. fp32; 1e-5 absolute on
losses, rewards, gradient norms and parameters."""

import argparse
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from llama import ModelArgs, Transformer
from llama.data.loader import DistributedDataLoader, eval_batches
from llama.data.windows import Batch, IGNORE_INDEX, WindowDataset
from llama.lora import LoRAConfig
from llama.training.preference import DPOConfig
from parallel.spawn import run_on_ranks

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=32)
SEQ, GLOBAL_BATCH, ACCUM, STEPS = 16, 8, 2, 2  # pairs: 2 per dp rank per micro-step on dp 2
PAIRS = GLOBAL_BATCH * STEPS
LR, MAX_NORM, SEED, REFERENCE_SEED = 1e-3, 1.0, 0, 1
# AdamW's eps above train.py's 1e-8, as in tests/test_lora.py: Adam's g / (sqrt(v) + eps) makes
# every update about lr in size, however small the gradient, so fp32 summation-order noise in
# the tiniest gradients would move a parameter by up to 2 lr
EPS = 1e-5
CONFIG = DPOConfig(beta=0.5)
TOL = 1e-5
WORLD = 4


class FixedPairs(WindowDataset):
    """PAIRS fixed pairs of SEQ-token rows (2i chosen, 2i + 1 rejected): random ids, targets
    on a random span (the reply) of each row, as llama.data's PairDataset lays them out."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray):
        super().__init__()
        self.inputs, self.targets = inputs, targets
        self.seq_len, self.seed, self.name, self.num_samples = SEQ, 0, "fixed pairs", len(inputs) // 2
        self.num_tokens = inputs.size

    def row(self, window: int):
        return self.inputs[2 * window], self.targets[2 * window], None

    def num_targets(self, sample: int) -> int:
        p = self.window_index(sample)
        return int((self.targets[2 * p: 2 * p + 2] != IGNORE_INDEX).sum())

    def _pairs(self, pairs: list) -> Batch:
        rows = [r for p in pairs for r in (2 * p, 2 * p + 1)]
        inputs, targets = self.inputs[rows], self.targets[rows].copy()
        padding = np.repeat(np.array(pairs) < 0, 2)
        targets[padding] = IGNORE_INDEX
        return Batch(torch.from_numpy(inputs).long(), torch.from_numpy(targets).long(), None, torch.tensor(pairs))

    def get_batch(self, first_sample, dp_rank, dp_size, micro_batch, stop=None) -> Batch:
        first = first_sample + dp_rank * micro_batch
        samples = range(first, first + micro_batch)
        return self._pairs([self.window_index(s) if stop is None or s < stop else -1 for s in samples])

    def reference_batches(self, dp_rank, dp_size, micro_batch):
        per_step = micro_batch * dp_size
        for first in range(0, -(-self.num_samples // per_step) * per_step, per_step):
            ids = range(first + dp_rank * micro_batch, first + (dp_rank + 1) * micro_batch)
            yield self._pairs([p if p < self.num_samples else -1 for p in ids])


def pairs() -> tuple:
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, ARGS.vocab_size, (2 * PAIRS, SEQ + 1), generator=gen)
    targets = tokens[:, 1:].clone()
    start = torch.randint(2, SEQ // 2, (2 * PAIRS, 1), generator=gen)  # the prompt's end
    stop = torch.randint(SEQ // 2 + 1, SEQ + 1, (2 * PAIRS, 1), generator=gen)  # the reply's end, then padding
    where = torch.arange(SEQ)[None]
    targets[(where < start) | (where >= stop)] = IGNORE_INDEX
    return tokens[:, :-1].numpy(), targets.numpy()


def _full(tensor) -> np.ndarray:
    tensor = tensor.detach()
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.float().numpy().copy()


# ---------------------------------------------------------------- the oracle, torch alone


def oracle_logps(model, inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
    """(pairs, 2) summed log-probabilities of the targets, and their counts."""
    logp = F.log_softmax(model(inputs).float(), dim=-1)
    valid = targets != IGNORE_INDEX
    token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    return token.sum(-1).view(-1, 2), valid.sum(-1).view(-1, 2).float()


def oracle_losses(policy, reference, counts, config: DPOConfig) -> torch.Tensor:
    """REFERENCE.md's closed forms, per pair."""
    if config.loss == "ipo":
        mean = (policy - reference) / counts
        return ((mean[:, 0] - mean[:, 1]) - 1 / (2 * config.beta)) ** 2
    h = config.beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    eps = config.label_smoothing
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


def oracle_reference(data: tuple) -> torch.Tensor:
    model = Transformer(ARGS).init_weights(REFERENCE_SEED)
    with torch.no_grad():
        logps, _ = oracle_logps(model, torch.from_numpy(data[0]).long(), torch.from_numpy(data[1]).long())
    return logps


def oracle_run(data: tuple, config: DPOConfig = CONFIG) -> dict:
    model = Transformer(ARGS).init_weights(SEED)
    reference = oracle_reference(data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=0.0)
    dataset = FixedPairs(*data)
    losses, accuracies, margins, norms = [], [], [], []
    for step in range(STEPS):
        ids = [dataset.window_index(s) for s in range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)]
        batch = dataset._pairs(ids)
        policy, counts = oracle_logps(model, batch.inputs, batch.targets)
        ref = reference[batch.pair_ids]
        loss = oracle_losses(policy, ref, counts, config).mean()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad()
        rewards = config.beta * (policy - ref).detach()
        losses.append(loss.item())
        accuracies.append((rewards[:, 0] > rewards[:, 1]).float().mean().item())
        margins.append((rewards[:, 0] - rewards[:, 1]).mean().item())
    return dict(losses=losses, accuracies=accuracies, margins=margins, norms=norms,
                final={n: _full(p) for n, p in model.named_parameters()}, reference=reference.numpy())


# ---------------------------------------------------------------- the project's path


@dataclass(frozen=True)
class Run:
    name: str
    tp: int
    pp: int = 1
    cp: int = 1
    sp: bool = False


RUNS = [Run("dp2xtp2-sp", tp=2, sp=True), Run("pp2xtp2", tp=2, pp=2), Run("cp2xtp2-sp", tp=2, cp=2, sp=True),
        Run("dp4", tp=1)]


def _optimizer(model):
    from llama.training.optim import param_groups

    opts = argparse.Namespace(weight_decay=0.0, decay_norms_and_embeddings=False)
    return torch.optim.AdamW(param_groups(model, opts), lr=LR, betas=(0.9, 0.95), eps=EPS, fused=True)


def _trainee(run: Run, mesh, seed: int = SEED, lora=None):
    from llama.training.step import Trainee
    from parallel.fsdp import build_parallel_model
    from parallel.mesh import cp_mesh
    from parallel.pipeline import PipelineConfig, build_pipeline

    options = dict(sequence_parallel=run.sp, seed=seed, lora=lora)
    if run.pp > 1:
        pipeline = build_pipeline(ARGS, mesh, PipelineConfig(microbatches=2), **options)
        return Trainee(pipeline.model, pipeline=pipeline, cp=cp_mesh(mesh))
    return Trainee(build_parallel_model(ARGS, mesh, **options), cp=cp_mesh(mesh))


def _reference_pass(trainee, dataset, loader, mesh, validation=()):
    """The project's reference pass with `trainee` as the reference: the table, on every rank."""
    from llama.training.reference import ReferenceLogps, ReferencePlan, reference_pass

    plan = ReferencePlan(ReferenceLogps(dataset.num_samples, "cpu"), "test", Path(tempfile.mkdtemp()) / "reference.pt")
    reference_pass(trainee, SimpleNamespace(train_set=dataset, loader=loader, validation=list(validation)), plan, mesh)
    return plan.reference


def _steps(trainee, objective, loader, mesh) -> dict:
    from llama.training.step import train_step
    from parallel.train_utils import sum_over_batch

    trainee.objective = objective
    optimizer = _optimizer(trainee.model)
    out = {"losses": [], "accuracies": [], "margins": [], "norms": []}
    for _ in range(STEPS):
        shares, norm, skipped = train_step(trainee, optimizer, loader, "cpu", MAX_NORM)
        assert not skipped
        names = ("loss", "reward_accuracy", "reward_margin")
        loss, accuracy, margin = sum_over_batch([float(shares[n]) for n in names], mesh)
        out["losses"].append(loss)
        out["accuracies"].append(accuracy)
        out["margins"].append(margin)
        out["norms"].append(float(norm))
    out["final"] = {n: _full(p) for n, p in trainee.model.named_parameters()}
    return out


def _gathered(params: dict) -> dict:
    everyone = [None] * dist.get_world_size()  # pp ranks hold different parameters
    dist.all_gather_object(everyone, params)
    return {n: v for part in everyone for n, v in part.items()}


def _worker(data: tuple) -> dict:
    from llama.training.evaluation import evaluate
    from llama.training.preference import PreferenceLoss
    from parallel.mesh import build_mesh, dp_rank, dp_size

    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    out = {}
    for run in RUNS:
        mesh = build_mesh(run.tp, cp=run.cp, pp=run.pp, device="cpu")
        dataset = FixedPairs(*data)
        loader = DistributedDataLoader(dataset, global_batch=GLOBAL_BATCH, dp_rank=dp_rank(mesh),
                                       dp_size=dp_size(mesh), grad_accum=ACCUM)
        # the reference: another model, through the project's pass on this mesh
        reference = _reference_pass(_trainee(run, mesh, seed=REFERENCE_SEED), dataset, loader, mesh)
        trainee = _trainee(run, mesh)
        result = _steps(trainee, PreferenceLoss(CONFIG, reference, trainee.cp), loader, mesh)
        result["final"] = _gathered(result["final"])
        result["reference"] = reference.table[:-1].numpy().copy()
        out[run.name] = result
    # the policy as its own reference at the start: the validation loss is log 2
    mesh = build_mesh(2, device="cpu")
    dataset = FixedPairs(*data)
    loader = DistributedDataLoader(dataset, global_batch=GLOBAL_BATCH, dp_rank=dp_rank(mesh), dp_size=dp_size(mesh))
    # 3 global batches of 6 pairs: all 16 pairs, the last batch padded with 2 pairs the loss ignores
    validation = list(eval_batches(dataset, 3, 6, dp_rank(mesh), dp_size(mesh), 3))
    trainee = _trainee(Run("tp2", tp=2, sp=True), mesh)
    reference = _reference_pass(trainee, dataset, loader, mesh, validation)
    trainee.objective = PreferenceLoss(CONFIG, reference, trainee.cp)
    out["start"] = evaluate(trainee, validation, "cpu", mesh)
    # LoRA: the base with its adapters off, per batch, against the base's stored pass
    lora = LoRAConfig(rank=4)
    for name, on_the_fly in (("lora-stored", False), ("lora-adapters-off", True)):
        trainee = _trainee(Run("tp2", tp=2, sp=True), mesh, lora=lora)
        reference = _reference_pass(trainee, dataset, loader, mesh) if not on_the_fly else None
        if on_the_fly:
            from llama.training.reference import ReferenceLogps

            reference = ReferenceLogps(dataset.num_samples, "cpu")
        objective = PreferenceLoss(CONFIG, reference, trainee.cp, reference_forward=on_the_fly)
        loader = DistributedDataLoader(dataset, global_batch=GLOBAL_BATCH, dp_rank=dp_rank(mesh), dp_size=dp_size(mesh))
        result = _steps(trainee, objective, loader, mesh)
        result["final"] = _gathered(result["final"])
        out[name] = result
    return out if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def launch():
    return run_on_ranks(_worker, WORLD, pairs())[0]


@pytest.fixture(scope="module")
def oracle():
    return oracle_run(pairs())


def one_device_run(data: tuple, config: DPOConfig) -> dict:
    """train_step on one device, no mesh, the reference table from the oracle."""
    from llama.training.preference import PreferenceLoss
    from llama.training.reference import ReferenceLogps
    from llama.training.step import Trainee

    dataset = FixedPairs(*data)
    reference = ReferenceLogps(dataset.num_samples, "cpu")
    reference.table[:-1] = oracle_reference(data)
    trainee = Trainee(Transformer(ARGS).init_weights(SEED))
    loader = DistributedDataLoader(dataset, global_batch=GLOBAL_BATCH, grad_accum=ACCUM)
    return _steps(trainee, PreferenceLoss(config, reference), loader, None)


def _compare(result: dict, expected: dict, name: str) -> None:
    for key in ("losses", "accuracies", "margins", "norms"):
        worst = max(abs(a - b) for a, b in zip(result[key], expected[key]))
        assert worst <= TOL, f"{name}: {key} {result[key]} vs the oracle's {expected[key]}"
    assert result["final"].keys() == expected["final"].keys()
    worst = max(np.abs(result["final"][n] - expected["final"][n]).max() for n in expected["final"])
    assert worst <= TOL, f"{name}: parameters differ from the oracle's by {worst:.3g} after {STEPS} steps"


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("config", [CONFIG, DPOConfig(beta=0.5, label_smoothing=0.2), DPOConfig(beta=0.5, loss="ipo")],
                         ids=["sigmoid", "sigmoid-smoothed", "ipo"])
def test_a_dpo_step_on_one_device_equals_the_oracle(oracle, config):
    expected = oracle if config == CONFIG else oracle_run(pairs(), config)
    result = one_device_run(pairs(), config)
    _compare(result, expected, f"1 device, {config.loss}")
    assert abs(expected["losses"][0] - math.log(2)) > 1e-2, "the reference is another model: the loss starts off log 2"


@pytest.mark.compat  # torch's pipelining changes between versions; DPO's pp path must hold on each
@pytest.mark.parametrize("name", [r.name for r in RUNS])
def test_a_dpo_step_on_every_mesh_equals_the_oracle(launch, oracle, name):
    _compare(launch[name], oracle, name)


@pytest.mark.parametrize("name", [r.name for r in RUNS])
def test_the_reference_pass_gives_the_oracles_log_probabilities_on_every_mesh(launch, oracle, name):
    worst = np.abs(launch[name]["reference"] - oracle["reference"]).max()
    assert worst <= TOL, f"{name}: reference log-probabilities differ by {worst:.3g}"


def test_at_the_start_the_validation_loss_is_log_2_and_no_pair_is_won(launch):
    start = launch["start"]
    assert abs(start["val_loss"] - math.log(2)) <= 1e-6, start
    assert start["val_reward_accuracy"] == 0 and abs(start["val_reward_margin"]) <= 1e-6, start


@pytest.mark.compat
def test_the_lora_base_with_adapters_off_gives_the_stored_references_numbers(launch):
    stored, on_the_fly = launch["lora-stored"], launch["lora-adapters-off"]
    _compare(on_the_fly, stored, "LoRA, adapters off per batch")
    assert abs(stored["losses"][-1] - math.log(2)) > 1e-4, "the adapters moved: the comparison is not empty"
