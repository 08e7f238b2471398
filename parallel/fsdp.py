"""2-D parallelism: FSDP2 (`fully_shard`) on the data-parallel mesh around the
tensor-parallel model.

The model's parameters are DTensors on the tp mesh; `fully_shard` adds a dp sharding
(Shard(0) of each rank's tp shard), so a rank holds a 2-D shard: 1/(dp*tp) of a
matrix. The four sharding strategies of FSDP1 map onto FSDP2 as:

  full          FULL_SHARD     shard over dp, free gathered params after forward
  grad_op       SHARD_GRAD_OP  shard over dp, keep gathered params until backward
  hybrid        HYBRID_SHARD   shard inside dp_shard, replicate across dp_replicate
  hybrid_zero2  hybrid + keep gathered params until backward

`build_parallel_model` is the one entry point: meta model -> compile -> activation
checkpointing -> fully_shard -> allocate only this rank's 2-D shard -> init or load.

Gradients come out *summed* over dp ranks, not averaged: the loss is normalised by
the global token count (`parallel.train_utils.token_loss`), which already holds the
1/N, so averaging again would make the gradient depend on the mesh.

Gradients that tp ranks compute in part: norm weights under sequence parallelism are
summed over tp in fp32 in backward (`parallel.layers.sequence_parallel_weight`), before
FSDP sees them; kv projections shared when tp > n_kv_heads
(`local_tensor(..., partial_grad=True)`) reach FSDP as tp-Partial DTensors, which FSDP2
redistributes to their parameter's tp placement (one tp all-reduce per such gradient, in
the compute dtype) before the dp reduce-scatter. So the training loop needs no
`reduce_partial_gradients` call (it would find nothing to do). tests/test_fsdp.py holds
this against single-device gradients.
"""

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts, noop_context_fn

from llama.config import ModelArgs
from llama.lora import LoRAConfig, add_adapters, init_adapters_, store_frozen_as
from llama.qlora import BASE_DTYPES, check_nf4_shapes, nf4_ignored_params, quantize_base_nf4_, require_torchao
from llama.model import Transformer

from .mesh import cp_mesh, dp_cp_mesh, is_hybrid, local_device, tp_mesh
from .train_utils import clip_grad_norm_

__all__ = ["STRATEGIES", "Strategy", "build_parallel_model", "clip_grad_norm_", "fsdp_groups", "get_strategy"]


@dataclass(frozen=True)
class Strategy:
    name: str
    hybrid: bool  # shard over dp_shard, replicate over dp_replicate
    reshard_after_forward: bool  # False: ZeRO-2 style, params stay gathered from forward to backward


STRATEGIES = {
    "full": Strategy("full", hybrid=False, reshard_after_forward=True),
    "grad_op": Strategy("grad_op", hybrid=False, reshard_after_forward=False),
    "hybrid": Strategy("hybrid", hybrid=True, reshard_after_forward=True),
    "hybrid_zero2": Strategy("hybrid_zero2", hybrid=True, reshard_after_forward=False),
}
MIXED_PRECISION = (None, "fp32", "bf16")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown --strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def fsdp_mesh(mesh: DeviceMesh, strategy: Strategy) -> DeviceMesh:
    """The mesh fully_shard runs on: 1-D "dp", or 2-D (dp_replicate, dp_shard) for HSDP.
    cp ranks count as data-parallel ranks (same parameters, different tokens): with
    context parallelism parameters are sharded over dp x cp ("dp_cp", or dp_shard x cp
    under HSDP)."""
    if strategy.hybrid:
        if not is_hybrid(mesh):
            raise ValueError(
                f"--strategy {strategy.name} needs the hybrid mesh (dp_replicate, dp_shard, tp); "
                f"build it with build_mesh(tp, dp_replicate=R, hybrid=True) / --dp-replicate R, got {mesh.mesh_dim_names}"
            )
        if "cp" not in mesh.mesh_dim_names:
            return mesh["dp_replicate", "dp_shard"]
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        with warnings.catch_warnings():
            # torch 2.11-2.13 slice a flattened dim from the root mesh (as torchtitan does for
            # HSDP with cp) and warn that a later release will want it kept elsewhere
            warnings.filterwarnings("ignore", message="Slicing a flattened dim")
            return mesh["dp_replicate", "dp_shard_cp"]
    return dp_cp_mesh(mesh)  # on a hybrid mesh: all dp (and cp) ranks, flattened


def mixed_precision_policy(name: Optional[str]) -> MixedPrecisionPolicy:
    """bf16: gather bf16 copies of the fp32 shards for compute, reduce gradients in fp32.
    The fp32 shards are the optimizer's master weights. Forward inputs are not cast: the
    activations are bf16 already (they come from bf16 weights), and the RoPE tables that
    blocks receive must stay fp32."""
    if name not in MIXED_PRECISION:
        raise ValueError(f"unknown --mixed-precision {name!r}; choose one of {', '.join(map(str, MIXED_PRECISION))}")
    if name == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def check_activation_checkpointing(mode: str) -> None:
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(
            f"unknown --activation-checkpointing {mode!r}; choose one of {', '.join(ACTIVATION_CHECKPOINTING)}"
        )


def checkpointed_blocks(n_layers: int, mode: str) -> list:
    """Indices of the blocks whose activations are recomputed in backward.
    selective = every other block (0, 2, 4, ...): half the activation memory of none,
    half the recompute of full."""
    check_activation_checkpointing(mode)
    if mode == "full":
        return list(range(n_layers))
    if mode == "selective":
        return list(range(0, n_layers, 2))
    return []


# The collectives whose outputs a recomputed block takes from its first forward instead
# of sending them again: the reductions that leave the tensor-parallel region
# (parallel/layers.py _leave_region), the all-reduce of each row-parallel output, or with
# sequence parallelism its reduce-scatter. Each is the size of the block's input (under
# SP, of its sequence shard), two per block. The all-gathers (SP's region inputs, the cp
# K/V gather) are tp or cp times larger, so they are sent again, and everything else is
# recomputed: the collectives of torchtitan's op-level policy, without its saved matmuls.
# The ops are those under parallel/compat.py's functional collectives, alike on every
# torch we admit; the wait_tensor after a saved output is recomputed, and finds the
# collective done.
SAVED_REDUCTIONS = frozenset(
    getattr(torch.ops._c10d_functional, name).default for name in ("all_reduce", "reduce_scatter_tensor")
)


def keep_reductions(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The selective checkpointing policy: the tp reductions' outputs saved, the rest recomputed."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_REDUCTIONS else CheckpointPolicy.PREFER_RECOMPUTE


def _saving_reductions():
    return create_selective_checkpoint_contexts(keep_reductions)


def _recompute_in_backward(forward, save_reductions: bool = True):
    context_fn = _saving_reductions if save_reductions else noop_context_fn

    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    return run


def blocks(model: Transformer) -> list:
    """(block id, block) of the blocks a model holds: all of them, or a pipeline stage's
    (whose `layers` is a ModuleDict keyed by block id)."""
    if isinstance(model.layers, torch.nn.ModuleDict):
        return [(int(i), block) for i, block in model.layers.items()]
    return list(enumerate(model.layers))


def apply_activation_checkpointing(model: Transformer, mode: str, compiled: bool = False) -> None:
    # The block's forward is wrapped in place rather than the block in a wrapper module:
    # parameter names stay Meta's (`layers.0.attention.wq.weight`), which checkpoint
    # loading and DCP rely on. FSDP's hooks sit outside, so recomputation re-gathers nothing.
    # Block ids are the whole model's, so a pipeline stage recomputes the blocks it would
    # recompute without a pipeline.
    # `compiled`: the blocks' forwards are torch.compile's (apply_compile), and a compiled
    # block recomputes everything. Around the compiled graph the policy would see
    # inductor's collectives, not ours: its all-reduces run in place (all_reduce_, which
    # the policy does not save), and a saved reduce-scatter output is a buffer of the
    # graph's, kept correct only as long as inductor writes nothing else into it, which
    # nothing promises.
    chosen = set(checkpointed_blocks(model.args.n_layers, mode))
    for i, block in blocks(model):
        if i in chosen:
            block.forward = _recompute_in_backward(block.forward, save_reductions=not compiled)


def apply_compile(model: Transformer, backend: str = "inductor") -> None:
    # Per block, so that all blocks share one compiled graph and FSDP's hooks (which
    # dynamo skips) stay between graphs instead of breaking one large graph.
    for _, block in blocks(model):
        block.forward = torch.compile(block.forward, backend=backend)


def fsdp_groups(model: Transformer, strategy: Strategy) -> list:
    """(name, module or modules, reshard_after_forward) for each FSDP group, in the order
    fully_shard is applied, the root last. Each group is gathered by one all-gather and
    its gradients reduced by one reduce-scatter (plus one all-reduce across dp_replicate
    for HSDP). The planner reads the same list."""
    reshard = strategy.reshard_after_forward
    groups = [(f"layers.{i}", block, reshard) for i, block in blocks(model)]
    if not model.args.tie_word_embeddings:
        if model.tok_embeddings is not None:  # None: a pipeline stage other than the first
            groups.append(("tok_embeddings", model.tok_embeddings, reshard))
        if model.output is not None:
            # used last in forward, first in backward: resharding would only gather them again
            groups.append(("norm+output", [model.norm, model.output], False))
    # Tied embeddings: one parameter is read by the first and the last module, so it can
    # only live in a group spanning both: the root (with the final norm).
    groups.append(("root", model, False))
    return groups


def apply_fsdp(
    model: Transformer,
    mesh: DeviceMesh,
    strategy: Strategy,
    mp_policy: MixedPrecisionPolicy = MixedPrecisionPolicy(),
    offload_policy: OffloadPolicy = OffloadPolicy(),
    ignored_params: Optional[set] = None,
) -> None:
    """ignored_params: parameters FSDP leaves unsharded and ungathered (QLoRA's NF4 base)."""
    dp = fsdp_mesh(mesh, strategy)
    for _, modules, reshard in fsdp_groups(model, strategy):
        fully_shard(modules, mesh=dp, reshard_after_forward=reshard, mp_policy=mp_policy, offload_policy=offload_policy,
                    ignored_params=ignored_params)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum over dp instead of averaging (see the module docstring). Forcing a plain
            # SUM keeps gloo working (it has no PREMUL_SUM / AVG reduce-scatter).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def check_base_dtype(base_dtype: str, lora: Optional[LoRAConfig]) -> None:
    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"--base-dtype {base_dtype}: choose one of {', '.join(BASE_DTYPES)}, or leave it out")
    if lora is None:
        raise ValueError(f"--base-dtype {base_dtype} stores a frozen base: it needs --lora-rank R (QLoRA)")
    require_torchao()


def _materialize_device(mesh: DeviceMesh, cpu_offload: bool) -> torch.device:
    return torch.device("cpu") if cpu_offload else local_device(mesh.device_type)


def build_parallel_model(
    source: Union[ModelArgs, str, Path],
    mesh: DeviceMesh,
    *,
    strategy: str = "full",
    sequence_parallel: bool = False,
    mixed_precision: Optional[str] = None,
    cpu_offload: bool = False,
    activation_checkpointing: str = "none",
    compile: Union[bool, str] = False,
    seed: int = 0,
    materialize: bool = True,
    init: bool = True,
    make_model=None,
    lora: Optional[LoRAConfig] = None,
    base_dtype: Optional[str] = None,
) -> Transformer:
    """The 2-D parallel model on `mesh` (from `parallel.mesh.build_mesh`).

    source: ModelArgs (random init, `Transformer.init_weights(seed)`: equal values on any
    mesh) or the directory of a converted checkpoint (each rank reads only its 2-D shard).
    compile: False, True (inductor) or a torch.compile backend name.
    materialize=False leaves the model on the meta device (the planner uses this).
    init=False allocates the shards without drawing or reading values: for a training
    checkpoint that is loaded over them next.
    make_model(args, tp_mesh, sequence_parallel, cp_mesh): builds something else than the
    whole Transformer on meta, e.g. a pipeline stage (parallel/pipeline.py).
    lora: LoRA adapters on the projections (llama/lora.py); the base is frozen, and stored
    in bf16 under bf16 mixed precision (nothing updates it, so it needs no fp32 master).
    A base read from `source` gets freshly drawn adapters (B = 0).
    base_dtype="nf4" (QLoRA, with lora): the seven projections' weights are kept out of
    FSDP, and each rank quantises its tp shard of them to NF4 once it is read or drawn
    (llama/qlora.py); the rest of the base is stored as above.

    Gradients are sums over dp ranks; normalise the loss by the global token count."""
    plan = get_strategy(strategy)
    mp_policy = mixed_precision_policy(mixed_precision)
    check_activation_checkpointing(activation_checkpointing)
    fsdp_mesh(mesh, plan)  # checks the mesh before anything is built
    if base_dtype is not None:
        check_base_dtype(base_dtype, lora)
    path = None
    if isinstance(source, ModelArgs):
        args = source
    else:
        from llama.weights.format import read_model_args

        path, args = Path(source), read_model_args(source)

    with torch.device("meta"):
        model = (make_model or Transformer)(args, tp_mesh(mesh), sequence_parallel, cp_mesh(mesh))
        if lora is not None:
            add_adapters(model, lora)
            if mp_policy.param_dtype is not None:
                store_frozen_as(model, mp_policy.param_dtype)
    ignored = None
    if base_dtype == "nf4":
        check_nf4_shapes(model)  # on meta: before anything is allocated
        ignored = nf4_ignored_params(model)
    if compile:
        apply_compile(model, "inductor" if compile is True else compile)
    # after compile: checkpoint runs eagerly around the compiled block (traced inside a
    # graph, the checkpoint would have to save the tp layers' DeviceMesh, which it cannot)
    apply_activation_checkpointing(model, activation_checkpointing, compiled=bool(compile))
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    apply_fsdp(model, mesh, plan, mp_policy, offload, ignored_params=ignored)
    if not materialize:
        return model

    # Only now is memory allocated: each rank's (dp, tp) shard of every parameter.
    model.to_empty(device=_materialize_device(mesh, cpu_offload))
    if not init:
        return model
    if path is None:
        model.init_weights(seed)
    else:
        from llama.weights.loading import load_weights_

        load_weights_(model, path)
        init_adapters_(model, seed)
    if base_dtype == "nf4":
        quantize_base_nf4_(model)
    return model
