"""Collective counts over one forward + backward, measured with CommDebugMode.

Megatron's minimum per transformer block is 2 all-reduces forward and 2 backward;
with sequence parallelism each becomes a reduce-scatter / all-gather pair. Outside
the blocks: the embedding's exit (1 forward; with sequence parallelism its
all-gather backward too), the LM head's entry (1 backward, plus
1 all-gather forward with sequence parallelism), the loss (1 small all-gather of
per-token statistics), and, with sequence parallelism, one small fp32 all-reduce per
norm weight in backward (2 per block, 1 for the final norm) that sums its gradient.

A block recomputed under activation checkpointing sends its region inputs' all-gathers
again but takes its reductions' outputs from the first forward (parallel/fsdp.py
keep_reductions); the planner counts the same."""

import pytest
import torch

from llama import ModelArgs, Transformer
from llama.lora import TARGETS, LoRAConfig, add_adapters
from parallel.layers import reduce_partial_gradients, sum_adapter_gradients
from parallel.losses import vocab_parallel_cross_entropy
from parallel.spawn import run_on_ranks
from tests.test_model import batch, tp_mesh

ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=32)


def counts_by_op(comm) -> dict:
    """CommDebugMode's counts by the op's short name (all_reduce, ...), overloads summed."""
    counts = {}
    for op, n in comm.get_comm_counts().items():
        name = str(op).split(".")[-1]
        counts[name] = counts.get(name, 0) + n
    return counts


LORA = LoRAConfig(rank=4)  # adapters on all seven projections


def _count_collectives(n_layers: int, sequence_parallel: bool, lora: bool = False) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode

    args = ModelArgs(**{**ARGS.to_dict(), "n_layers": n_layers})
    with torch.device("meta"):
        model = Transformer(args, tp_mesh(), sequence_parallel=sequence_parallel)
        if lora:
            add_adapters(model, LORA)
    model.init_weights(seed=0)
    tokens, targets = batch(args)
    with CommDebugMode() as comm:
        loss = vocab_parallel_cross_entropy(model(tokens), targets)
        loss.backward()
        reduce_partial_gradients(model)
    return counts_by_op(comm)


def _recomputed_step(mesh_dim: str, sequence_parallel: bool, checkpointing: str) -> tuple:
    """(collectives per op, gradients) of one forward + backward of a 2-block model on a 1-D
    mesh of every rank, tp (with or without sequence parallelism) or cp, its blocks
    checkpointed as build_parallel_model checkpoints them."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    from parallel.context import split_for_cp
    from parallel.fsdp import apply_activation_checkpointing

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=(mesh_dim,))
    tp, cp = (mesh, None) if mesh_dim == "tp" else (None, mesh)
    with torch.device("meta"):
        model = Transformer(RECOMPUTED_ARGS, tp, sequence_parallel=sequence_parallel, cp_mesh=cp)
    model.init_weights(seed=0)
    apply_activation_checkpointing(model, checkpointing)
    tokens, targets = (split_for_cp(t, cp) for t in batch(RECOMPUTED_ARGS))
    with CommDebugMode() as comm:
        vocab_parallel_cross_entropy(model(tokens), targets).backward()
        reduce_partial_gradients(model)
    counts = counts_by_op(comm)
    # as numpy: tensors would travel back through shared memory that dies with the rank
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).numpy()
             for name, p in model.named_parameters()}
    return counts, grads


RECOMPUTED_ARGS = ModelArgs(**{**ARGS.to_dict(), "n_layers": 2})
RECOMPUTED = {"tp": ("tp", False), "tp+sp": ("tp", True), "cp": ("cp", False)}  # case: mesh dim, sequence parallel


def _adapter_gradient_sums(tp: bool) -> tuple:
    """(gradients summed, collectives per op) of sum_adapter_gradients after one forward +
    backward of a 2-block LoRA model, on the tp mesh of both ranks or on no mesh (tp 1)."""
    from torch.distributed.tensor.debug import CommDebugMode

    with torch.device("meta"):
        model = Transformer(RECOMPUTED_ARGS, tp_mesh() if tp else None, sequence_parallel=tp)
        add_adapters(model, LORA)
    model.init_weights(seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_b"):
                param.fill_(0.01)  # B nonzero, so that A gets a gradient
    tokens, targets = batch(RECOMPUTED_ARGS)
    vocab_parallel_cross_entropy(model(tokens), targets).backward()
    with CommDebugMode() as comm:
        summed = sum_adapter_gradients(model)
    return summed, counts_by_op(comm)


def _count_on_two_ranks() -> dict:
    return {
        "megatron": {(layers, sp): _count_collectives(layers, sp) for layers in (1, 2) for sp in (False, True)},
        "lora": {(layers, sp): _count_collectives(layers, sp, lora=True) for layers in (1, 2) for sp in (False, True)},
        "adapter sums": {tp: _adapter_gradient_sums(tp) for tp in (False, True)},
        "recomputed": {(case, mode): _recomputed_step(*how, mode) for case, how in RECOMPUTED.items()
                       for mode in ("none", "full")},
    }


@pytest.fixture(scope="module")
def counted():
    """One 2-rank launch counts the collectives of every case below."""
    return run_on_ranks(_count_on_two_ranks, 2)[0]


@pytest.mark.compat
def test_collectives_per_step_are_the_megatron_minimum_at_tp2(counted):
    counts = counted["megatron"]
    one, two = counts[(1, False)], counts[(2, False)]
    # embedding 1 + block 2 fwd + 2 bwd + LM head entry 1 bwd; loss: 1 all-gather
    assert one == {"all_reduce": 6, "all_gather_into_tensor": 1}
    assert two == {"all_reduce": 10, "all_gather_into_tensor": 1}
    per_block = {k: two[k] - one.get(k, 0) for k in two}
    assert per_block == {"all_reduce": 4, "all_gather_into_tensor": 0}

    one, two = counts[(1, True)], counts[(2, True)]
    # embedding exit 1 RS forward, 1 AG backward; block 2 AG + 2 RS forward, 2 RS + 2 AG
    # backward; head entry 1 AG forward, 1 RS backward; loss 1 AG; norm gradients 1 AR per
    # norm (2 per block, the final norm's)
    assert one == {"reduce_scatter_tensor": 6, "all_gather_into_tensor": 7, "all_reduce": 3}
    assert two == {"reduce_scatter_tensor": 10, "all_gather_into_tensor": 11, "all_reduce": 5}
    per_block = {k: two[k] - one.get(k, 0) for k in two}
    assert per_block == {"reduce_scatter_tensor": 4, "all_gather_into_tensor": 4, "all_reduce": 2}


@pytest.mark.compat
def test_lora_on_all_seven_projections_keeps_the_megatron_minimum_per_block_at_tp2(counted):
    """The adapters' products join their layer's own collectives (parallel/layers.py), so a
    block sends what it sends without them: 4 all-reduces, or with sequence parallelism 4
    reduce-scatters and 4 all-gathers. With the base frozen there is less, never more: no
    norm-weight all-reduces (frozen norms have no gradient), and backward stops at the
    first block's region input (nothing below it trains), so the first block's input
    gradient and the embedding's exit send nothing in backward."""
    assert LORA.targets == TARGETS and len(TARGETS) == 7
    base, lora = counted["megatron"], counted["lora"]
    assert lora[(1, False)] == {"all_reduce": 6 - 1, "all_gather_into_tensor": 1}
    assert lora[(2, False)] == {"all_reduce": 10 - 1, "all_gather_into_tensor": 1}
    assert lora[(1, True)] == {"reduce_scatter_tensor": 6 - 1, "all_gather_into_tensor": 7 - 1}
    assert lora[(2, True)] == {"reduce_scatter_tensor": 10 - 1, "all_gather_into_tensor": 11 - 1}
    for sp in (False, True):
        per_block = {k: lora[(2, sp)][k] - lora[(1, sp)].get(k, 0) for k in lora[(2, sp)]}
        base_per_block = {k: base[(2, sp)][k] - base[(1, sp)].get(k, 0) for k in base[(2, sp)]}
        assert per_block == {k: n for k, n in base_per_block.items() if k != "all_reduce" or not sp}, sp
    assert {k: lora[(2, True)][k] - lora[(1, True)][k] for k in lora[(2, True)]} == {
        "reduce_scatter_tensor": 4, "all_gather_into_tensor": 4}


def test_adapter_gradients_are_summed_over_tp_by_one_all_reduce_per_step(counted):
    """sum_adapter_gradients (train_step calls it once a step) sums every replicated
    factor's tp shares, 7 per block (A of wq, wk, wv, w1, w3; B of wo, w2), in one
    all-reduce at tp 2; without tp it has nothing to sum and sends nothing."""
    summed, comm = counted["adapter sums"][True]
    assert (summed, comm) == (7 * RECOMPUTED_ARGS.n_layers, {"all_reduce": 1})
    assert counted["adapter sums"][False] == (0, {})


# ---------------------------------------------------------------- recomputed blocks


PLANNED_OPS = {"all_gather": "all_gather_into_tensor", "reduce_scatter": "reduce_scatter_tensor", "all_reduce": "all_reduce"}


def _planned_calls(case: str) -> dict:
    """The planner's calls per op of the case's mesh dimension, for one forward + backward
    of the counted model with every block checkpointed, without the gradient norm's
    all-reduce (the counted step clips nothing)."""
    from parallel.plan.config import StepConfig
    from parallel.plan.layout import Layout
    from parallel.plan.planner import plan

    dim, sp = RECOMPUTED[case]
    tokens, _ = batch(RECOMPUTED_ARGS)
    cfg = StepConfig(seq_len=tokens.shape[1], batch=tokens.shape[0], sequence_parallel=sp, mixed_precision="fp32",
                     activation_checkpointing="full", document_masking=False)
    tp, layout = (2, Layout()) if dim == "tp" else (1, Layout(cp=2))
    comm = plan(RECOMPUTED_ARGS, 2, tp, cfg=cfg, strategies=["full"], layout=layout)["full"]["comm"][dim]
    calls = {PLANNED_OPS[op]: entry["calls"] for op, entry in comm.items()}
    if dim == "tp":  # tp is the whole world here, so the gradient norm's 8-byte all-reduce is tp's
        calls["all_reduce"] -= 1
    return {op: n for op, n in calls.items() if n}


@pytest.mark.compat
def test_a_recomputed_block_sends_its_gathers_again_but_not_its_reductions(counted):
    """2 blocks, every one recomputed in backward: the recomputation sends each block's
    sequence-parallel all-gathers again (2 per block) and its cp K/V all-gather (1), but
    none of its tp reductions (the all-reduces without sequence parallelism, the
    reduce-scatters with it), whose outputs it kept; the planner counts the same calls.
    The gradients equal those without checkpointing."""
    runs = counted["recomputed"]
    again = {"tp": {}, "tp+sp": {"all_gather_into_tensor": 2 * 2}, "cp": {"all_gather_into_tensor": 2}}
    for case in RECOMPUTED:
        (plain, plain_grads), (recomputed, grads) = runs[(case, "none")], runs[(case, "full")]
        sent_again = {op: n - plain.get(op, 0) for op, n in recomputed.items() if n != plain.get(op, 0)}
        assert sent_again == again[case], f"{case}: recomputation sent {sent_again} again, from {plain} to {recomputed}"
        assert recomputed == _planned_calls(case), case
        for name, grad in grads.items():
            assert abs(grad - plain_grads[name]).max() <= 1e-6, f"{case}: {name}"


# ---------------------------------------------------------------- norm gradients in fp32


def _all_reduce_dtypes(model, args) -> list:
    """(dtype, numel) of every all-reduce in one forward + backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class AllReduces(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name == "_c10d_functional::all_reduce":
                self.seen.append((str(args[0].dtype), args[0].numel()))
            return func(*args, **(kwargs or {}))

    tokens, targets = batch(args)
    with AllReduces() as reduces:
        vocab_parallel_cross_entropy(model(tokens), targets).backward()
    return reduces.seen


def _bf16_norm_gradient_reductions() -> dict:
    from parallel.fsdp import build_parallel_model
    from parallel.mesh import build_mesh

    args = ModelArgs(**{**ARGS.to_dict(), "n_layers": 2})
    with torch.device("meta"):
        plain = Transformer(args, tp_mesh(), sequence_parallel=True)
    plain.init_weights(seed=0).to(torch.bfloat16)
    fsdp = build_parallel_model(args, build_mesh(tp=2), sequence_parallel=True, mixed_precision="bf16")
    return {"bf16 params": _all_reduce_dtypes(plain, args), "FSDP bf16 mixed precision": _all_reduce_dtypes(fsdp, args)}


def test_norm_weight_gradients_are_summed_over_tp_in_fp32_under_bf16():
    """Under sequence parallelism each tp rank's norm-weight gradient is its share of the
    sum; the shares are summed in fp32 (parallel/layers.py sequence_parallel_weight), with
    bf16 parameters and under FSDP's bf16 mixed precision alike: 5 all-reduces of dim
    elements (2 blocks x 2 norms + the final norm), every one on an fp32 tensor."""
    for case, seen in run_on_ranks(_bf16_norm_gradient_reductions, 2)[0].items():
        norms = [dtype for dtype, numel in seen if numel == ARGS.dim]
        assert norms == ["torch.float32"] * 5, f"{case}: {seen}"


# ---------------------------------------------------------------- copies around the collectives


def _copied_bytes(fn) -> int:
    """Bytes written by the ops fn runs besides the collectives: views, allocations and
    the collectives' own buffers are free."""
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {"empty", "new_empty", "empty_like", "empty_strided"}

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            namespace, name = func._schema.name.split("::")
            if namespace == "aten" and not func.is_view and name not in free:
                outputs = out if isinstance(out, (tuple, list)) else [out]
                # an in-place copy writes its destination; others their outputs
                self.bytes += sum(t.numel() * t.element_size() for t in outputs if isinstance(t, torch.Tensor))
            return out

    with Copies() as copies:
        fn()
    return copies.bytes


def _copies_per_collective() -> dict:
    """Per batch size: bytes copied by each sequence gather / scatter (forward, backward), in
    units of the whole-sequence tensor's bytes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.compat import all_gather_along, reduce_scatter_along
    from parallel.context import gather_for_cp

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    out = {}
    for bsz in (1, 2):
        whole = torch.randn(bsz, 16, 4, 8)  # (batch, seq, heads, head_dim): K and V under cp
        part = torch.randn(bsz, 8, 4, 8, requires_grad=True)
        units = whole.numel() * whole.element_size()
        gathered = gather_for_cp(part, mesh)
        out[bsz] = {
            "all_gather_along seq": _copied_bytes(lambda: all_gather_along(part.detach(), 1, mesh)) / units,
            "reduce_scatter_along seq": _copied_bytes(lambda: reduce_scatter_along(whole, 1, mesh)) / units,
            "cp gather forward": _copied_bytes(lambda: gather_for_cp(part, mesh)) / units,
            "cp gather backward": _copied_bytes(lambda: torch.autograd.grad(gathered, part, whole)) / units,
        }
    return out


def test_sequence_gathers_and_scatters_copy_no_more_than_the_layout_needs():
    """The collectives run on dim 0; along the sequence (dim 1) a batch of 1 has the same
    layout, a larger batch needs one copy of the tensor to interleave the ranks' parts.
    Context parallelism's reordering of the chunks is that one copy, forward and backward
    (parallel/context.py), not a second one after torch's."""
    copies = run_on_ranks(_copies_per_collective, 2)[0]
    assert copies[1] == {"all_gather_along seq": 0, "reduce_scatter_along seq": 0, "cp gather forward": 1, "cp gather backward": 1}
    assert copies[2] == {"all_gather_along seq": 1, "reduce_scatter_along seq": 1, "cp gather forward": 1, "cp gather backward": 1}
