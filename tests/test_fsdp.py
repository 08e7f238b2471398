"""2-D parallelism (FSDP2 over dp x tensor parallel): every sharding strategy trains like
one device, gradients the tp ranks compute in part are summed, checkpoints load as 2-D
shards, and the planner's numbers are what a real run holds and sends.

One 4-rank gloo launch trains every configuration (the `launch` fixture) and the tests
read its results; the single-device reference trains in the test process. fp32
tolerances: 1e-5 absolute on parameters, losses and gradient norms, 1e-6 on gradients."""

import contextlib
import logging
import math
from dataclasses import dataclass, replace
from typing import Optional, Union

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llama import ModelArgs, Transformer
from llama.weights.format import save_checkpoint
from parallel.fsdp import build_parallel_model, get_strategy, mixed_precision_policy, check_activation_checkpointing
from parallel.mesh import build_mesh, dp_mesh, dp_rank
from parallel.plan.config import StepConfig
from parallel.plan.counter import CommCounter
from parallel.plan.planner import plan
from parallel.spawn import run_on_ranks
from parallel.train_utils import clip_grad_norm_, sum_over_dp, token_loss
from tests.test_mesh import one_line_error

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=32)
SEQ, BATCH, ACCUM, STEPS = 16, 4, 2, 3  # global batch: 4 sequences x 2 micro-steps; 3 steps
LR, EPS, MAX_NORM, SEED = 1e-3, 1e-5, 1.0, 0  # MAX_NORM below the norms (~1.4): clipping is active
UNEVEN = replace(ARGS, vocab_size=130)  # 65 vocab rows per tp rank: dp shards of 33 and 32 (FSDP pads)
TOL, GRAD_TOL = 1e-5, 1e-6
# bf16 vs fp32: per tensor, |update_bf16 - update_fp32| / |update_fp32|, the update being the
# movement from init over the three steps (a few bf16 sign flips in Adam's first steps)
BF16_UPDATE_RTOL = 0.1
WORLD = 4


@dataclass(frozen=True)
class Run:
    strategy: str
    mesh: tuple  # (dp, tp), or (dp_replicate, dp_shard, tp) for the hybrid strategies
    sp: bool = True
    tied: bool = False
    mixed_precision: Optional[str] = None
    activation_checkpointing: str = "none"
    cpu_offload: bool = False
    compile: Union[bool, str] = False

    @property
    def args(self) -> ModelArgs:
        return replace(ARGS, tie_word_embeddings=self.tied)

    @property
    def tp(self) -> int:
        return self.mesh[-1]

    @property
    def dp(self) -> int:
        return math.prod(self.mesh[:-1])

    def __str__(self) -> str:
        flags = [f for f, on in [("sp", self.sp), ("tied", self.tied), ("offload", self.cpu_offload)] if on]
        flags += [v for v in (self.mixed_precision, self.compile and "compile") if v]
        if self.activation_checkpointing != "none":
            flags.append(f"ac-{self.activation_checkpointing}")
        return f"{self.strategy}-{'x'.join(map(str, self.mesh))}" + "".join(f"-{f}" for f in flags)


# dp x tp; for the hybrid strategies dp is written dp_replicate x dp_shard
MESHES = [(2, 2), (4, 1), (1, 4)]
HYBRID_MESHES = [(2, 1, 2), (2, 2, 1), (1, 1, 4), (1, 2, 2)]
STRATEGY_RUNS = [Run(s, m, sp=m[-1] > 1) for s in ("full", "grad_op") for m in MESHES] + [
    Run(s, m, sp=m[-1] > 1) for s in ("hybrid", "hybrid_zero2") for m in HYBRID_MESHES
]
OPTION_RUNS = [
    Run("full", (2, 2), sp=False, tied=True),
    Run("hybrid", (1, 2, 2), tied=True),
    Run("full", (1, 4), sp=False),  # tp 4 > 2 kv heads: wk/wv replicated, partial gradients without SP
    Run("full", (2, 2), activation_checkpointing="full"),
    Run("grad_op", (2, 2), activation_checkpointing="selective"),
    Run("full", (2, 2), cpu_offload=True),
    Run("full", (2, 2), compile=True, activation_checkpointing="selective"),
]
BF16_RUN = Run("full", (2, 2), mixed_precision="bf16")
FP32_RUNS = STRATEGY_RUNS + OPTION_RUNS
RUNS = FP32_RUNS + [BF16_RUN]
# kv heads per rank < 1 at tp 4: wk/wv gradients are partial sums over tp
PARTIAL_KV_RUNS = [r for r in FP32_RUNS if r.tp > ARGS.n_kv_heads]


def global_batches() -> tuple:
    """inputs, targets: (STEPS, ACCUM, BATCH, SEQ). Sequence i has i/6 of its targets
    ignored (-100): ranks see different token counts, so averaging per-rank means, or
    dividing by a per-rank count, would be wrong."""
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, ARGS.vocab_size, (STEPS, ACCUM, BATCH, SEQ + 1), generator=gen)
    inputs, targets = tokens[..., :-1], tokens[..., 1:]
    keep = torch.rand(targets.shape, generator=gen) >= torch.linspace(0.0, 0.5, BATCH)[:, None]
    return inputs, targets.masked_fill(~keep, -100)


def step_target_tokens(batches) -> list:
    """Target tokens (not -100) in each step's whole global batch, every micro-step of every
    dp rank: what train.py's loader reports (`DistributedDataLoader.step_target_tokens`),
    known to every rank without a collective."""
    _, targets = batches
    return [int((targets[step] != -100).sum()) for step in range(STEPS)]


def _full(tensor) -> np.ndarray:
    tensor = tensor.detach()
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.float().numpy().copy()


def _full_params(model) -> dict:
    return {n: _full(p) for n, p in model.named_parameters()}


def train(model, batches, step_tokens, mesh=None, clip=clip_grad_norm_, count_first_step=contextlib.nullcontext()):
    """STEPS AdamW steps of ACCUM micro-batches each, as train.py runs them; the loss
    normalised by the step's global token count. Returns the losses, gradient norms and the
    first step's clipped gradients."""
    inputs, targets = batches
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=EPS)
    losses, norms, first_grads = [], [], None
    for step in range(STEPS):
        with count_first_step if step == 0 else contextlib.nullcontext():
            count = step_tokens[step]
            loss = 0.0
            for micro in range(ACCUM):
                share = token_loss(model(inputs[step, micro]), targets[step, micro], count)
                share.backward()
                loss += share.item()
            norms.append(float(clip(model.parameters(), MAX_NORM)))
        losses.append(sum_over_dp(loss, mesh))
        if step == 0:
            first_grads = {n: _full(p.grad) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return losses, norms, first_grads


# ---------------------------------------------------------------- the 4-rank launch

_MESHES = {}


def _mesh(shape):
    if shape not in _MESHES:
        hybrid = len(shape) == 3
        _MESHES[shape] = build_mesh(shape[-1], dp_replicate=shape[0] if hybrid else 1, hybrid=hybrid)
    return _MESHES[shape]


def _local_rows(batches, mesh, dp):
    """This dp rank's sequences of every micro-batch; the ranks of a tp group get the same."""
    per = BATCH // dp
    r = dp_rank(mesh)
    return tuple(t[:, :, r * per : (r + 1) * per] for t in batches)


def _compiled_blocks(model) -> dict:
    """Per block, whether its forward (under any checkpoint wrapper) is torch.compile's
    wrapper of that block's own forward; and how many graphs dynamo holds for the block code
    after training (shared by the blocks: one per guard set, not one per block)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from llama.model import TransformerBlock

    compiled = []
    for block in model.layers:
        forward = block.forward
        while not hasattr(forward, "_torchdynamo_orig_callable") and hasattr(forward, "__wrapped__"):
            forward = forward.__wrapped__  # the activation-checkpointing wrapper
        original = getattr(forward, "_torchdynamo_orig_callable", None)
        compiled.append(getattr(original, "__self__", None) is block)
    graphs = len(_debug_get_cache_entry_list(TransformerBlock.forward.__code__))
    return {"blocks_compiled": compiled, "block_graphs": graphs}


def _error(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return "no error"


def _worker(runs, batches, checkpoint_dirs):
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    rank0 = dist.get_rank() == 0
    out = {
        # raised before any collective, so every rank gets here: no hang
        "bad_mesh_errors": [_error(lambda: build_mesh(3)), _error(lambda: build_mesh(2, dp_replicate=3, hybrid=True))],
        "layouts": {
            shape: {name: _mesh(shape)[name].mesh.tolist() for name in _mesh(shape).mesh_dim_names}
            for shape in [(2, 2), (2, 1, 2)]
        },
        "dp_groups": {shape: dp_mesh(_mesh(shape)).mesh.tolist() for shape in [(2, 2), (2, 1, 2)]},
    }
    results = []
    for run in runs:
        mesh = _mesh(run.mesh)
        model = build_parallel_model(
            run.args,
            mesh,
            strategy=run.strategy,
            sequence_parallel=run.sp,
            mixed_precision=run.mixed_precision,
            activation_checkpointing=run.activation_checkpointing,
            cpu_offload=run.cpu_offload,
            compile=run.compile,
            seed=SEED,
        )
        held = sum(p.to_local().numel() for p in model.parameters())
        # dynamo leaves a function uncompiled for good if a dispatch mode is active on its
        # first call: the compiled run goes uncounted
        counter = CommCounter(mesh) if not run.compile else contextlib.nullcontext()
        losses, norms, grads = train(
            model, _local_rows(batches, mesh, run.dp), step_target_tokens(batches), mesh, count_first_step=counter
        )
        params = _full_params(model)
        comm = counter.summary() if not run.compile else _compiled_blocks(model)
        results.append(dict(losses=losses, norms=norms, grads=grads, params=params, held=held, comm=comm))
    out["results"] = dict(zip(runs, results))
    out["loaded"], out["initialised"] = {}, {}
    for name, shape, strategy in [
        ("even", (2, 2), "full"), ("even", (1, 2, 2), "hybrid_zero2"), ("uneven", (2, 2), "full"), ("uneven", (4, 1), "grad_op")
    ]:
        model = build_parallel_model(checkpoint_dirs[name], _mesh(shape), strategy=strategy, sequence_parallel=True)
        out["loaded"][(name, shape)] = _full_params(model)
        if name == "uneven":
            model = build_parallel_model(UNEVEN, _mesh(shape), strategy=strategy, sequence_parallel=True, seed=3)
            out["initialised"][shape] = _full_params(model)
    return out if rank0 else out["bad_mesh_errors"]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    checkpoints, dirs = {}, {}
    for name, args in [("even", ARGS), ("uneven", UNEVEN)]:
        dirs[name] = str(tmp_path_factory.mktemp(name))
        source = Transformer(args).init_weights(seed=7)
        save_checkpoint({n: p.detach() for n, p in source.named_parameters()}, args, dirs[name])
        checkpoints[name] = _full_params(source)
    outputs = run_on_ranks(_worker, WORLD, RUNS, global_batches(), dirs)
    out = outputs[0]
    out["bad_mesh_errors_per_rank"] = [out["bad_mesh_errors"]] + outputs[1:]
    out["checkpoints"] = checkpoints
    return out


@pytest.fixture(scope="module")
def references():
    """Single-device training on the whole global batch, with torch's own clipping."""
    out = {}
    for tied in (False, True):
        model = Transformer(replace(ARGS, tie_word_embeddings=tied)).init_weights(SEED)
        init = _full_params(model)
        batches = global_batches()
        losses, norms, grads = train(model, batches, step_target_tokens(batches), clip=torch.nn.utils.clip_grad_norm_)
        out[tied] = dict(losses=losses, norms=norms, grads=grads, params=_full_params(model), init=init)
    return out


def max_diff(a: dict, b: dict, names=None) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[n] - b[n]).max()) for n in (names or a))


# ---------------------------------------------------------------- parity


@pytest.mark.compat
@pytest.mark.parametrize("run", FP32_RUNS, ids=str)
def test_three_adamw_steps_equal_single_device_training(launch, references, run):
    got, want = launch["results"][run], references[run.tied]
    assert max_diff(got["params"], want["params"]) < TOL
    assert np.allclose(got["norms"], want["norms"], rtol=0, atol=TOL), (got["norms"], want["norms"])
    assert np.allclose(got["losses"], want["losses"], rtol=0, atol=TOL), (got["losses"], want["losses"])


@pytest.mark.compat
@pytest.mark.parametrize("run", FP32_RUNS, ids=str)
def test_first_step_gradients_equal_single_device_gradients(launch, references, run):
    assert max_diff(launch["results"][run]["grads"], references[run.tied]["grads"]) < GRAD_TOL


@pytest.mark.compat
def test_partial_tp_gradients_are_summed_over_tp_under_fsdp(launch, references):
    """Norm weights under sequence parallelism and kv projections shared by tp ranks get
    tp-Partial gradients. FSDP2 redistributes them to the parameter's tp placement (one
    tp all-reduce each) before its dp reduce-scatter: nothing is dropped."""
    sp_runs = [r for r in FP32_RUNS if r.sp]
    assert sp_runs and PARTIAL_KV_RUNS
    for run in sp_runs + PARTIAL_KV_RUNS:
        got, want = launch["results"][run]["grads"], references[run.tied]["grads"]
        partial = [n for n in got if (run.sp and n.endswith("norm.weight")) or
                   (run in PARTIAL_KV_RUNS and n.endswith(("wk.weight", "wv.weight")))]
        assert partial
        assert max_diff(got, want, partial) < GRAD_TOL, run
        if run.sp and not run.compile:  # activations move by all-gather / reduce-scatter; tp all-reduces are these
            tp_all_reduces = launch["results"][run]["comm"]["tp"]["all_reduce"]["calls"]
            clipping = 1 if run.tp == WORLD else 0  # the gradient norm's world all-reduce, when tp is the world
            assert tp_all_reduces == len(partial) * ACCUM + clipping, run  # one per partial gradient per backward


def test_bf16_mixed_precision_trains_close_to_fp32(launch, references):
    """Each parameter's update (its movement from init, which is the same in both runs) is
    within BF16_UPDATE_RTOL of the fp32 run's update: the values alone would hide a run
    that barely moved, since three steps of lr 1e-3 change them by ~1e-3 of themselves."""
    got, want = launch["results"][BF16_RUN], references[False]
    assert np.allclose(got["norms"], want["norms"], rtol=1e-2), (got["norms"], want["norms"])
    assert np.allclose(got["losses"], want["losses"], rtol=1e-3), (got["losses"], want["losses"])
    assert got["params"].keys() == want["params"].keys() == want["init"].keys()
    errors = {}
    for name, init in want["init"].items():
        ours, theirs = got["params"][name] - init, want["params"][name] - init
        errors[name] = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    worst = max(errors, key=errors.get)
    assert errors[worst] < BF16_UPDATE_RTOL, (worst, errors[worst], errors)


def test_compile_per_block_really_compiles(launch):
    """The compiled run's parity is checked above; here: every block's forward (the
    checkpointed ones under their wrapper) is compiled, and dynamo holds fewer graphs for
    the block code than there are blocks: the blocks share them instead of each getting its
    own (with selective checkpointing, recomputation may add a guard set)."""
    (run,) = [r for r in RUNS if r.compile]
    compiled = launch["results"][run]["comm"]
    assert compiled["blocks_compiled"] == [True] * ARGS.n_layers
    assert 1 <= compiled["block_graphs"] < ARGS.n_layers


def test_checkpoint_loads_as_2d_shards_on_any_mesh(launch):
    """Each rank reads only its (dp, tp) shard; gathered, the model equals the file,
    also where FSDP's dp shards are uneven (and padded)."""
    for (name, shape), params in launch["loaded"].items():
        assert max_diff(params, launch["checkpoints"][name]) == 0.0, (name, shape)


def test_random_init_of_2d_shards_does_not_depend_on_the_mesh(launch):
    want = _full_params(Transformer(UNEVEN).init_weights(seed=3))
    for shape, params in launch["initialised"].items():
        assert max_diff(params, want) == 0.0, shape


# ---------------------------------------------------------------- mesh


def test_mesh_puts_tp_innermost_and_flattens_hybrid_dp(launch):
    assert launch["layouts"][(2, 2)] == {"dp": [0, 2], "tp": [0, 1]}
    assert launch["layouts"][(2, 1, 2)] == {"dp_replicate": [0, 2], "dp_shard": [0], "tp": [0, 1]}
    assert launch["dp_groups"] == {(2, 2): [0, 2], (2, 1, 2): [0, 2]}


def test_world_size_that_does_not_fit_fails_alike_on_every_rank(launch):
    per_rank = launch["bad_mesh_errors_per_rank"]
    assert all(errors == per_rank[0] for errors in per_rank)
    tp_error, replicate_error = per_rank[0]
    assert tp_error == "--tp 3 must divide the world size 4 (nodes x processes per node)"
    assert replicate_error.startswith("--dp-replicate 3 must divide the data-parallel size 2")


# ---------------------------------------------------------------- planner


def _planned(run: Run) -> dict:
    cfg = StepConfig(
        seq_len=SEQ,
        batch=BATCH // run.dp,
        grad_accum=ACCUM,
        sequence_parallel=run.sp,
        mixed_precision=run.mixed_precision or "fp32",
        activation_checkpointing=run.activation_checkpointing,
    )
    dp_replicate = run.mesh[0] if len(run.mesh) == 3 else 1
    return plan(run.args, WORLD, run.tp, dp_replicate, cfg, strategies=[run.strategy])[run.strategy]


@pytest.mark.parametrize("run", [r for r in RUNS if not r.compile], ids=str)
def test_planner_matches_what_a_real_run_holds_and_sends(launch, run):
    """Parameters held by rank 0, and every collective of one training step as train.py runs
    it (ACCUM forward/backward passes, gradient clipping; the token count comes from the
    loader, no collective) per mesh dimension: calls, payload bytes and ring bytes."""
    got, planned = launch["results"][run], _planned(run)
    assert planned["params_per_rank"] == got["held"]
    assert planned["param_bytes"] == 4 * got["held"]
    assert planned["comm"] == got["comm"]


# ---------------------------------------------------------------- bad input


def test_bad_strategy_and_options_get_one_clear_line():
    one_line_error(lambda: get_strategy("zero3"), "unknown --strategy 'zero3'", "full, grad_op, hybrid, hybrid_zero2")
    one_line_error(lambda: mixed_precision_policy("fp16"), "--mixed-precision 'fp16'", "bf16")
    one_line_error(lambda: check_activation_checkpointing("some"), "--activation-checkpointing 'some'", "selective")


def test_hybrid_strategy_on_a_2d_mesh_names_the_flag():
    """Checked before anything is built, so on a 2-D mesh every rank fails alike."""

    class Mesh2D:
        mesh_dim_names = ("dp", "tp")

    one_line_error(
        lambda: build_parallel_model(ARGS, Mesh2D(), strategy="hybrid"), "--strategy hybrid", "--dp-replicate"
    )
