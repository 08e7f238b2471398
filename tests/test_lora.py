"""LoRA (llama/lora.py, parallel/layers.py): the adapted model starts as the base exactly,
trains like one device on every mesh, changes nothing but its adapters, sends only the
adapters' gradients over dp, and stores the frozen base in bf16 under bf16 mixed precision.

One 4-rank gloo launch (the `launch` fixture) trains every mesh with train.py's own step
(llama.training.step.train_step: backward, sum_adapter_gradients, clipping, AdamW on
llama.training.optim's parameter groups) on a real DistributedDataLoader; the oracle
trains in the test process: a plain single-device Transformer, torch's AdamW on the
trainable parameters, torch's clip_grad_norm_, the loss its summed token cross-entropy
over the step's target count. fp32 tolerances: 1e-5 absolute on losses, gradient norms
and every adapter value (measured worst: under 1e-6). Collective counts per block with
LoRA are in tests/test_comm.py, train.py with --lora-* in tests/test_train.py."""

import argparse
import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Union

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from llama import ModelArgs, Transformer
from llama.data.loader import DistributedDataLoader
from llama.data.windows import WindowDataset
from llama.lora import LoRAConfig, add_adapters, is_adapter
from parallel.spawn import run_on_ranks

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=32)
LORA = LoRAConfig(rank=4)  # every projection, alpha 8: scale 2
SEQ, GLOBAL_BATCH, ACCUM, STEPS = 16, 8, 2, 3
WINDOWS = GLOBAL_BATCH * STEPS  # one epoch of the loader's order
LR, WEIGHT_DECAY, MAX_NORM, SEED = 1e-2, 0.1, 0.05, 0  # MAX_NORM below every step's norm: clipping is active
# AdamW's eps above train.py's 1e-8: A's first gradients are tiny (B starts at zero), and
# Adam's g / (sqrt(v) + eps) would magnify fp32 summation-order noise in them past 1e-5
EPS = 1e-5
TOL = 1e-5
WORLD = 4


class FixedWindows(WindowDataset):
    """WINDOWS fixed windows of SEQ tokens (random ids; window i has about i/(2 WINDOWS) of
    its targets ignored, so dp ranks count different targets) in the loader's seeded order."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray):
        super().__init__()
        self.inputs, self.targets = inputs, targets
        self.seq_len, self.seed, self.name, self.num_samples = SEQ, 0, "fixed windows", len(inputs)
        self.num_tokens = inputs.size

    def row(self, window: int):
        return self.inputs[window], self.targets[window], None

    def num_targets(self, sample: int) -> int:
        return int((self.targets[self.window_index(sample)] != -100).sum())


def windows() -> tuple:
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, ARGS.vocab_size, (WINDOWS, SEQ + 1), generator=gen)
    targets = tokens[:, 1:].clone()
    ignored = torch.rand(targets.shape, generator=gen) < torch.linspace(0.0, 0.5, WINDOWS)[:, None]
    return tokens[:, :-1].numpy(), targets.masked_fill(ignored, -100).numpy()


@dataclass(frozen=True)
class Run:
    name: str
    tp: int
    pp: int = 1
    cp: int = 1
    sp: bool = False
    dp_replicate: int = 1  # > 1: HSDP (--strategy hybrid), parameters replicated over dp_replicate
    activation_checkpointing: str = "none"
    compile: Union[bool, str] = False
    n_kv_heads: int = ARGS.n_kv_heads

    @property
    def args(self) -> ModelArgs:
        return replace(ARGS, n_kv_heads=self.n_kv_heads)


RUNS = [
    Run("dp2xtp2-sp", tp=2, sp=True),
    Run("hsdp2xtp2-sp", tp=2, sp=True, dp_replicate=2),
    Run("tp4", tp=4),  # tp 4 > 2 kv heads: wk/wv (and their B) replicated, each rank using its rows
    # tp 2 > 1 kv head: the replicated B's shares summed over tp after FSDP cut them over dp
    Run("dp2xtp2-1kv", tp=2, n_kv_heads=1),
    Run("pp2xtp2-sp", tp=2, pp=2, sp=True),
    Run("pp2xdp2", tp=1, pp=2),
    Run("cp2xtp2-sp", tp=2, cp=2, sp=True),
    Run("dp2xtp2-sp-ac-full", tp=2, sp=True, activation_checkpointing="full"),
    # aot_eager: dynamo's graphs and AOT autograd around the adapters, without inductor's
    # code generation (minutes on 2 shared cores; it passes too)
    Run("dp2xtp2-sp-compile-ac-selective", tp=2, sp=True, activation_checkpointing="selective", compile="aot_eager"),
]
COUNTED_RUN = "dp2xtp2-sp"


def _full(tensor) -> np.ndarray:
    tensor = tensor.detach()
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.float().numpy().copy()


def _optimizer(model) -> torch.optim.Optimizer:
    """train.py's AdamW (llama.training.optim: its parameter groups, which leave the frozen
    base out, and its fused CPU kernel), with EPS."""
    from llama.training.optim import param_groups

    opts = argparse.Namespace(weight_decay=WEIGHT_DECAY, decay_norms_and_embeddings=False)
    return torch.optim.AdamW(param_groups(model, opts), lr=LR, betas=(0.9, 0.95), eps=EPS, fused=True)


# ---------------------------------------------------------------- the 4-rank launch


def _train(run: Run, data: tuple) -> dict:
    from llama.training.step import Trainee, train_step
    from parallel.fsdp import build_parallel_model
    from parallel.mesh import build_mesh, cp_mesh, dp_rank, dp_size
    from parallel.pipeline import PipelineConfig, build_pipeline
    from parallel.plan.counter import CommCounter
    from parallel.train_utils import sum_over_batch

    hybrid = run.dp_replicate > 1
    mesh = build_mesh(run.tp, dp_replicate=run.dp_replicate, hybrid=hybrid, cp=run.cp, pp=run.pp, device="cpu")
    options = dict(strategy="hybrid" if hybrid else "full", sequence_parallel=run.sp, compile=run.compile,
                   activation_checkpointing=run.activation_checkpointing, seed=SEED, lora=LORA)
    if run.pp > 1:
        pipeline = build_pipeline(run.args, mesh, PipelineConfig(microbatches=2), **options)
        trainee = Trainee(pipeline.model, pipeline=pipeline)
    else:
        trainee = Trainee(build_parallel_model(run.args, mesh, **options), cp=cp_mesh(mesh))
    model = trainee.model
    init = {n: _full(p) for n, p in model.named_parameters()}
    optimizer = _optimizer(model)
    loader = DistributedDataLoader(FixedWindows(*data), global_batch=GLOBAL_BATCH, dp_rank=dp_rank(mesh),
                                   dp_size=dp_size(mesh), grad_accum=ACCUM)
    losses, norms, comm = [], [], None
    for step in range(STEPS):
        # the first step's collectives per mesh dimension, counted on one plain 2-D run
        counter = CommCounter(mesh) if step == 0 and run.name == COUNTED_RUN else contextlib.nullcontext()
        with counter:
            loss, norm, skipped = train_step(trainee, optimizer, loader, "cpu", MAX_NORM)
        comm = counter.summary() if step == 0 and run.name == COUNTED_RUN else comm
        assert not skipped
        losses.append(sum_over_batch(float(loss["loss"]), mesh))
        norms.append(float(norm))
    final = {n: _full(p) for n, p in model.named_parameters()}
    return dict(losses=losses, norms=norms, init=init, final=final, optimizer_states=len(optimizer.state),
                trainable=sum(p.requires_grad for p in model.parameters()), compiled=_compiled_blocks(model),
                comm=comm)


def _compiled_blocks(model) -> list:
    """Per block, whether its forward (under any checkpoint wrapper) is torch.compile's."""
    from parallel.fsdp import blocks

    compiled = []
    for _, block in blocks(model):
        forward = block.forward
        while not hasattr(forward, "_torchdynamo_orig_callable") and hasattr(forward, "__wrapped__"):
            forward = forward.__wrapped__  # the activation-checkpointing wrapper
        compiled.append(hasattr(forward, "_torchdynamo_orig_callable"))
    return compiled


def _logits(lora) -> np.ndarray:
    from parallel.fsdp import build_parallel_model
    from parallel.mesh import build_mesh

    model = build_parallel_model(ARGS, build_mesh(2, device="cpu"), sequence_parallel=True, seed=SEED, lora=lora)
    tokens, _ = _step0_batch()
    with torch.no_grad():
        return _full(model(tokens))


def _bf16_run(data: tuple) -> dict:
    """Under bf16 mixed precision: name -> dtype of the stored (sharded) parameters, and the
    losses of STEPS steps."""
    from llama.training.step import Trainee, train_step
    from parallel.fsdp import build_parallel_model
    from parallel.mesh import build_mesh, dp_rank, dp_size
    from parallel.train_utils import sum_over_batch

    mesh = build_mesh(2, device="cpu")
    model = build_parallel_model(ARGS, mesh, sequence_parallel=True, mixed_precision="bf16", seed=SEED, lora=LORA)
    dtypes = {n: str(p.dtype) for n, p in model.named_parameters()}
    optimizer = _optimizer(model)
    loader = DistributedDataLoader(FixedWindows(*data), global_batch=GLOBAL_BATCH, dp_rank=dp_rank(mesh),
                                   dp_size=dp_size(mesh), grad_accum=ACCUM)
    losses = [sum_over_batch(float(train_step(Trainee(model), optimizer, loader, "cpu", MAX_NORM)[0]["loss"]), mesh)
              for _ in range(STEPS)]
    return {"dtypes": dtypes, "losses": losses}


def _worker(runs: list, data: tuple) -> dict:
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    out = {"runs": {}}
    for run in runs:
        result = _train(run, data)
        gathered = [None] * dist.get_world_size()  # pp ranks hold different parameters: gather them all
        dist.all_gather_object(gathered, {k: result[k] for k in ("init", "final", "optimizer_states", "trainable")})
        result["init"] = {n: v for r in gathered for n, v in r["init"].items()}
        result["final"] = {n: v for r in gathered for n, v in r["final"].items()}
        result["optimizer_states"] = [r["optimizer_states"] for r in gathered]
        result["trainable"] = [r["trainable"] for r in gathered]
        out["runs"][run.name] = result
    out["logits"] = {"base": _logits(None), "lora": _logits(LORA)}
    out["bf16"] = _bf16_run(data)
    return out if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def launch():
    return run_on_ranks(_worker, WORLD, RUNS, windows())[0]


# ---------------------------------------------------------------- the single-device oracle


def _oracle_model(args: ModelArgs = ARGS) -> Transformer:
    model = Transformer(args)
    add_adapters(model, LORA)
    return model.init_weights(SEED)


@pytest.fixture(scope="module")
def oracle() -> dict:
    """n_kv_heads -> three steps on one device, written with torch alone around the model:
    the global batch's summed token cross-entropy over its target count, torch's clipping
    and AdamW on the parameters that require gradients."""
    return {n: _oracle_run(replace(ARGS, n_kv_heads=n)) for n in sorted({r.n_kv_heads for r in RUNS})}


def _oracle_run(args: ModelArgs) -> dict:
    model = _oracle_model(args)
    init = {n: _full(p) for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=WEIGHT_DECAY)
    loader = DistributedDataLoader(FixedWindows(*windows()), global_batch=GLOBAL_BATCH)  # one rank, one micro-step
    losses, norms = [], []
    for _ in range(STEPS):
        batch = next(loader)
        logits = model(batch.inputs)
        count = int((batch.targets != -100).sum())
        summed = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100, reduction="sum")
        loss = summed / count
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return dict(losses=losses, norms=norms, init=init, final={n: _full(p) for n, p in model.named_parameters()})


@pytest.fixture(scope="module")
def one_device() -> dict:
    """The project's own path on one device, no mesh: train_step with train.py's optimizer."""
    from llama.training.step import Trainee, train_step

    model = _oracle_model()
    init = {n: _full(p) for n, p in model.named_parameters()}
    optimizer = _optimizer(model)
    loader = DistributedDataLoader(FixedWindows(*windows()), global_batch=GLOBAL_BATCH, grad_accum=ACCUM)
    losses, norms = [], []
    for _ in range(STEPS):
        loss, norm, _ = train_step(Trainee(model), optimizer, loader, "cpu", MAX_NORM)
        losses.append(float(loss["loss"]))
        norms.append(float(norm))
    return dict(losses=losses, norms=norms, init=init, final={n: _full(p) for n, p in model.named_parameters()},
                optimizer_states=[len(optimizer.state)], trainable=[sum(p.requires_grad for p in model.parameters())])


def _step0_batch() -> tuple:
    inputs, targets = windows()
    return torch.from_numpy(inputs[:4]).long(), torch.from_numpy(targets[:4]).long()


def _results(launch, one_device, name) -> dict:
    return one_device if name == "1 device" else launch["runs"][name]


def _kv_heads(name: str) -> int:
    return next((r.n_kv_heads for r in RUNS if r.name == name), ARGS.n_kv_heads)


RESULT_NAMES = ["1 device"] + [r.name for r in RUNS]


# ---------------------------------------------------------------- step 0


def test_step0_logits_with_lora_equal_the_base_exactly_on_one_device():
    tokens, _ = _step0_batch()
    base = Transformer(ARGS).init_weights(SEED)
    with torch.no_grad():
        assert (_oracle_model()(tokens) - base(tokens)).abs().max().item() == 0.0


def test_step0_logits_with_lora_equal_the_base_exactly_on_tp2(launch):
    logits = launch["logits"]
    assert logits["lora"].shape == (4, SEQ, ARGS.vocab_size)
    assert np.abs(logits["lora"] - logits["base"]).max() == 0.0


def test_an_adapted_layer_computes_its_weight_plus_the_scaled_low_rank_update():
    """y = x W^T + (alpha / r) x A^T B^T, with B made nonzero (it starts at zero)."""
    model = _oracle_model()
    wq = model.layers[0].attention.wq
    torch.manual_seed(0)
    with torch.no_grad():
        wq.lora_b.normal_()
    x = torch.randn(2, 3, ARGS.dim)
    want = x @ wq.weight.T + LORA.scale * (x @ wq.lora_a.T @ wq.lora_b.T)
    assert LORA.scale == 2.0
    assert (wq(x) - want).abs().max().item() < 1e-5


# ---------------------------------------------------------------- training equals one device


@pytest.mark.parametrize("name", RESULT_NAMES)
def test_three_lora_adamw_steps_equal_the_single_device_oracle(launch, one_device, oracle, name):
    got, oracle = _results(launch, one_device, name), oracle[_kv_heads(name)]
    assert np.allclose(got["losses"], oracle["losses"], rtol=0, atol=TOL), (got["losses"], oracle["losses"])
    assert np.allclose(got["norms"], oracle["norms"], rtol=0, atol=TOL), (got["norms"], oracle["norms"])
    assert all(n > MAX_NORM for n in oracle["norms"]), "clipping must be active"
    adapters = sorted(n for n in oracle["final"] if is_adapter(n))
    assert len(adapters) == 2 * 7 * ARGS.n_layers
    assert sorted(n for n in got["final"] if is_adapter(n)) == adapters
    worst = max((float(np.abs(got["final"][n] - oracle["final"][n]).max()), n) for n in adapters)
    assert worst[0] < TOL, f"{name}: {worst[1]} differs from the oracle by {worst[0]:.3g}"
    # not an empty comparison: B left zero and A moved by far more than the tolerance
    for factor in ("lora_a", "lora_b"):
        moved = max(float(np.abs(oracle["final"][n] - oracle["init"][n]).max()) for n in adapters if n.endswith(factor))
        assert moved > 100 * TOL, (factor, moved)


def test_the_compiled_run_compiled_every_block_and_the_others_none(launch):
    for run in RUNS:
        compiled = launch["runs"][run.name]["compiled"]  # rank 0's blocks: one of the two under pp
        assert len(compiled) == ARGS.n_layers // run.pp and set(compiled) == {bool(run.compile)}, run.name


def test_fsdp_reduce_scatters_only_the_adapters_gradients(launch):
    """On dp 2 x tp 2 each backward reduce-scatters, per block, the gradients of that
    block's adapters as this tp rank holds them (fp32), and nothing of the frozen base: the
    groups without adapters (embedding, final norm and head) send no reduce-scatter."""
    comm = launch["runs"][COUNTED_RUN]["comm"]
    column, row = ("wq", "wk", "wv", "w1", "w3"), ("wo", "w2")
    local = 0  # adapter elements a tp rank holds: B split in column layers, A split in row layers
    for name, param in _oracle_model().named_parameters():
        layer = name.rsplit(".", 2)[-2]
        if is_adapter(name):
            split = (name.endswith("lora_b") and layer in column) or (name.endswith("lora_a") and layer in row)
            local += param.numel() // (2 if split else 1)
    assert comm["dp"]["reduce_scatter"] == {"calls": ACCUM * ARGS.n_layers, "bytes": ACCUM * 4 * local,
                                            "wire_bytes": ACCUM * 4 * local // 2}
    # and the one all-reduce of sum_adapter_gradients among the tp collectives
    assert comm["tp"]["all_reduce"]["calls"] == 1


# ---------------------------------------------------------------- only adapters train


@pytest.mark.parametrize("name", RESULT_NAMES)
def test_only_adapters_change_and_only_they_have_optimizer_state(launch, one_device, name):
    got = _results(launch, one_device, name)
    assert got["init"].keys() == got["final"].keys()
    base = [n for n in got["init"] if not is_adapter(n)]
    assert len(base) == len(Transformer(ARGS).state_dict())
    changed = [n for n in base if not np.array_equal(got["init"][n], got["final"][n])]
    assert changed == [], f"{name}: frozen base parameters changed: {changed}"
    # per rank: AdamW state for exactly the adapters the rank holds, nothing for the base
    assert got["optimizer_states"] == got["trainable"]
    assert sum(got["trainable"]) >= 2 * 7 * ARGS.n_layers


# ---------------------------------------------------------------- bf16 storage


def test_under_bf16_mixed_precision_the_frozen_base_is_stored_in_bf16_and_the_adapters_in_fp32(launch, oracle):
    oracle = oracle[ARGS.n_kv_heads]
    dtypes = launch["bf16"]["dtypes"]
    adapters = {n: d for n, d in dtypes.items() if is_adapter(n)}
    base = {n: d for n, d in dtypes.items() if not is_adapter(n)}
    assert len(adapters) == 2 * 7 * ARGS.n_layers and len(base) == len(Transformer(ARGS).state_dict())
    assert set(adapters.values()) == {"torch.float32"}
    assert set(base.values()) == {"torch.bfloat16"}
    # and it trains: bf16 compute, the fp32 oracle's losses to bf16's precision
    bf16_losses = launch["bf16"]["losses"]
    assert np.allclose(bf16_losses, oracle["losses"], rtol=1e-2), (bf16_losses, oracle["losses"])
