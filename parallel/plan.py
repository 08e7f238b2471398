"""Memory and communication planner for 2-D training (FSDP2 over dp, tensor parallel over tp).

    python -m parallel.plan --model 3.1-405b --nodes 16 --gpus-per-node 8 [--json]

It builds the real model with `build_parallel_model` on the meta device, on a fake
process group of the full world size (nothing is allocated, nothing is sent), and reads
rank 0's shard shapes off the DTensors; rank 0 holds the largest shards when a size
does not divide evenly. From them, per rank and per optimizer step:

  params        the fp32 shards (with bf16 mixed precision they are the master weights;
                FSDP2 keeps no second copy)
  grads         fp32 shards of the same size
  optimizer     AdamW m and v, fp32
  gathered      peak of the unsharded (compute-dtype) parameters FSDP holds at once
  unsharded grads, reduce-scatter
                FSDP2's gradient of the block computing (compute dtype, unsharded) and
                the fp32 reduce-scatter input of the block being reduced
  activations   see `activation_bytes`
  attention     the fused kernel's backward workspace and the document block mask
  = allocated   what torch.cuda.max_memory_allocated() should show
  + slack, CUDA context, NCCL buffers (outside the allocator's count; see the constants)
  = total       what must fit in the GPU's memory (`--gpu-memory`)
  comm          every collective of a training step, per mesh dimension: count, payload
                bytes (all-gather: gathered output; reduce-scatter: input; all-reduce:
                the tensor) and bytes each rank sends on a ring ((n-1)/n of the payload,
                twice that for an all-reduce)

`CommCounter` records the same quantities from a real run, so tests can hold the
planner to what actually happens. The defaults are train.py's (tests/test_plan.py holds
them equal), with bf16 because that is train.py's default on CUDA.
"""

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode

from llama.config import PRESETS, ModelArgs

from .fsdp import STRATEGIES, build_parallel_model, checkpointed_blocks, fsdp_groups, get_strategy
from .layers import CROSS_ENTROPY_CHUNK_BYTES
from .mesh import build_mesh, dp_mesh, is_hybrid, mesh_shape

GIB = 2**30
MIB = 2**20

# What the caching allocator does not count. Assumptions, per GPU process:
# the CUDA context with cuBLAS/cuDNN kernels loaded lazily (CUDA_MODULE_LOADING=LAZY, the
# default since CUDA 11.7) and cuBLAS's workspaces: nvidia-smi shows 0.5-1 GiB for a
# PyTorch process on an H100 before its first tensor; we take the top of that range
CUDA_CONTEXT_BYTES = GIB
# NCCL's buffers, per communicator this rank belongs to (one per mesh dimension of more
# than one rank, plus the world's): NCCL_BUFFSIZE (4 MiB) per channel per peer, with up to
# 32 channels on NVLink/InfiniBand, ring and tree protocols: ~200-300 MiB each is typical
CUDA_NCCL_BYTES_PER_GROUP = 256 * MIB
# Fragmentation and rounding of the caching allocator: reserved exceeds the peak allocated
# by ~5-15% in training loops (torch.cuda.memory_stats: reserved_bytes vs
# allocated_bytes); we take the top of that range on the allocated peak
ALLOCATOR_SLACK = 0.15
# flex attention's block size: a document block mask holds int32 block counts and indices
# per (sequence, query block, key block), for full and partial blocks, forward and transposed
FLEX_BLOCK = 128


# ---------------------------------------------------------------- collectives


@dataclass(frozen=True)
class Collective:
    dim: str  # mesh dimension, or "world"
    op: str  # all_gather | reduce_scatter | all_reduce
    bytes: int  # payload: gathered output / scattered input / reduced tensor
    group_size: int

    @property
    def wire_bytes(self) -> float:
        """Bytes one rank sends on a ring."""
        share = (self.group_size - 1) / self.group_size
        return self.bytes * share * (2 if self.op == "all_reduce" else 1)


def summarize(collectives) -> dict:
    """{dim: {op: {"calls", "bytes", "wire_bytes"}}}"""
    out: dict = defaultdict(lambda: defaultdict(lambda: {"calls": 0, "bytes": 0, "wire_bytes": 0}))
    for c in collectives:
        entry = out[c.dim][c.op]
        entry["calls"] += 1
        entry["bytes"] += c.bytes
        entry["wire_bytes"] += round(c.wire_bytes)
    return {dim: dict(ops) for dim, ops in out.items()}


def group_labels(mesh: DeviceMesh) -> dict:
    """process-group name -> mesh dimension name; a group no dimension owns is "world"."""
    labels = {dist.group.WORLD.group_name: "world"}
    for name in mesh.mesh_dim_names:
        labels[mesh[name].get_group().group_name] = name
    if is_hybrid(mesh):
        labels[dp_mesh(mesh).get_group().group_name] = "dp"
    return labels


def _group_name(group) -> str:
    if isinstance(group, str):
        return group
    if isinstance(group, torch.ScriptObject):
        group = dist.ProcessGroup.unbox(group)
    return group.group_name


def _nbytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


class CommCounter(TorchDispatchMode):
    """Records every collective issued inside the `with` block, from the tensor-parallel
    layers (functional collectives), from DTensor redistributions and from FSDP (c10d ops)."""

    def __init__(self, mesh: DeviceMesh):
        super().__init__()
        self.labels = group_labels(mesh)
        # DTensor caches sharding specs by value, so a process that built several meshes
        # may run a collective on an equal earlier mesh's group: fall back to its ranks
        self.by_ranks = {}
        for name, label in self.labels.items():
            self.by_ranks.setdefault(self._ranks(name), label)
        self.collectives: list = []

    @staticmethod
    def _ranks(group_name: str) -> tuple:
        return tuple(dist.get_process_group_ranks(dist.distributed_c10d._resolve_process_group(group_name)))

    def _record(self, op: str, nbytes: int, group) -> None:
        name = _group_name(group)
        ranks = self._ranks(name)
        label = self.labels.get(name) or self.by_ranks.get(ranks, name)
        self.collectives.append(Collective(label, op, nbytes, len(ranks)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns, name = func._schema.name.split("::")
        if ns == "_c10d_functional":
            if name == "all_reduce":
                self._record("all_reduce", _nbytes(args[0]), args[2])
            elif name == "all_gather_into_tensor":
                self._record("all_gather", _nbytes(args[0]) * args[1], args[2])
            elif name == "reduce_scatter_tensor":
                self._record("reduce_scatter", _nbytes(args[0]), args[3])
            elif name not in ("wait_tensor", "_wrap_tensor_autograd"):
                raise NotImplementedError(f"CommCounter: unhandled collective {func}")
        elif ns == "c10d":
            if name == "_allgather_base_":
                self._record("all_gather", _nbytes(args[0]), args[2])
            elif name == "_reduce_scatter_base_":
                self._record("reduce_scatter", _nbytes(args[1]), args[2])
            elif name == "allreduce_":
                self._record("all_reduce", _nbytes(args[0]), args[1])
            elif name not in ("monitored_barrier_", "barrier"):
                raise NotImplementedError(f"CommCounter: unhandled collective {func}")
        return func(*args, **kwargs)

    def summary(self) -> dict:
        return summarize(self.collectives)


# ---------------------------------------------------------------- the model of a step


# train.py's defaults, which the planner plans unless told otherwise (bf16: train.py's
# default on CUDA). tests/test_plan.py holds the two equal.
DEFAULTS = dict(
    seq_len=256, batch=4, grad_accum=1, strategy="full", sequence_parallel=False, mixed_precision="bf16",
    activation_checkpointing="none", document_masking=True,
)


@dataclass(frozen=True)
class StepConfig:
    seq_len: int = DEFAULTS["seq_len"]
    batch: int = DEFAULTS["batch"]  # sequences per dp rank per micro-step
    grad_accum: int = DEFAULTS["grad_accum"]
    sequence_parallel: bool = DEFAULTS["sequence_parallel"]
    mixed_precision: str = DEFAULTS["mixed_precision"]
    activation_checkpointing: str = DEFAULTS["activation_checkpointing"]
    # on CUDA: flex attention with a block mask; off: SDPA's flash kernel, causal only
    document_masking: bool = DEFAULTS["document_masking"]

    @property
    def compute_bytes(self) -> int:
        return 2 if self.mixed_precision == "bf16" else 4


def _own_params(modules, claimed: set) -> list:
    modules = modules if isinstance(modules, list) else [modules]
    params = []
    for module in modules:
        for param in module.parameters():
            if id(param) not in claimed:
                claimed.add(id(param))
                params.append(param)
    return params


def group_shards(model, strategy) -> list:
    """(name, numel of this rank's shard, reshard_after_forward) per FSDP group. Rank 0's
    shard is FSDP's padded shard size, which the collectives move."""
    claimed: set = set()
    groups = []
    for name, modules, reshard in fsdp_groups(model, strategy):
        numel = sum(p.to_local().numel() for p in _own_params(modules, claimed))
        if numel:
            groups.append((name, numel, reshard))
    return groups


def fsdp_collectives(groups, dims: dict, strategy, cfg: StepConfig) -> list:
    """Per micro-step: each group is gathered in forward (and again in backward when it was
    resharded), its gradients reduce-scattered, and for HSDP all-reduced across replicas.
    FSDP skips the all-gather and reduce-scatter on a one-rank shard group."""
    shard_dim = "dp_shard" if strategy.hybrid else "dp"
    shard = dims[shard_dim]
    out = []
    for _, numel, reshard in groups:
        if shard > 1:
            gathered = Collective(shard_dim, "all_gather", shard * numel * cfg.compute_bytes, shard)
            out += [gathered] * (2 if reshard else 1)
            out.append(Collective(shard_dim, "reduce_scatter", shard * numel * 4, shard))
        if strategy.hybrid:
            out.append(Collective("dp_replicate", "all_reduce", numel * 4, dims["dp_replicate"]))
    return out * cfg.grad_accum


def tp_collectives(model, cfg: StepConfig, tp: int) -> list:
    """Per micro-step, the tensor-parallel layers' collectives (Megatron's minimum: per
    block 2 in forward, 2 in backward, each an all-reduce of the (batch, seq, dim)
    activation, or a reduce-scatter + all-gather pair with sequence parallelism), the
    forward of recomputed blocks again up to w2, the loss's small all-gather, and the all-reduce
    of each gradient the tp ranks computed in part (norms under sequence parallelism,
    kv projections shared when tp > n_kv_heads)."""
    if tp == 1:
        return []
    args = model.args
    act = cfg.batch * cfg.seq_len * args.dim * cfg.compute_bytes
    sp = cfg.sequence_parallel

    def enter(pass_):  # RegionInput: identity / all-gather forward, all-reduce / reduce-scatter backward
        if sp:
            return [Collective("tp", "all_gather" if pass_ == "fwd" else "reduce_scatter", act, tp)]
        return [Collective("tp", "all_reduce", act, tp)] if pass_ == "bwd" else []

    def leave(pass_):  # row-parallel output: all-reduce / reduce-scatter forward, identity / all-gather backward
        if sp:
            return [Collective("tp", "reduce_scatter" if pass_ == "fwd" else "all_gather", act, tp)]
        return [Collective("tp", "all_reduce", act, tp)] if pass_ == "fwd" else []

    block_fwd = enter("fwd") + leave("fwd") + enter("fwd") + leave("fwd")
    block_bwd = enter("bwd") + leave("bwd") + enter("bwd") + leave("bwd")
    # Recomputation stops once the last tensor backward needs is rebuilt (the MLP's
    # product, w2's input), so w2's collective is not repeated.
    recompute = enter("fwd") + leave("fwd") + enter("fwd")
    recomputed = len(checkpointed_blocks(args.n_layers, cfg.activation_checkpointing))
    out = leave("fwd") + leave("bwd")  # embedding
    out += (block_fwd + block_bwd) * args.n_layers + recompute * recomputed
    out += enter("fwd") + enter("bwd")  # output head
    tokens = cfg.batch * cfg.seq_len
    out.append(Collective("tp", "all_gather", tp * 2 * tokens * 4, tp))  # loss: (log-sum-exp, target logit) fp32

    partial = []
    for name, param in model.named_parameters():
        shared_kv = name.endswith(("wk.weight", "wv.weight")) and not model.layers[0].attention.layout.kv_sharded
        if (sp and name.endswith("norm.weight")) or shared_kv:
            partial.append(Collective("tp", "all_reduce", param.numel() * cfg.compute_bytes, tp))
    return (out + partial) * cfg.grad_accum


def step_collectives(model, mesh: DeviceMesh, strategy, cfg: StepConfig) -> list:
    """Every collective of one optimizer step of train.py: grad_accum x (forward + backward),
    gradient-norm all-reduce. The step's token count comes from the data loader, which
    knows the global batch (no collective); the logged loss's dp all-reduce runs only on
    log steps and is left out."""
    dims = {name: mesh[name].size() for name in mesh.mesh_dim_names}
    labels = group_labels(mesh)
    out = []
    out += fsdp_collectives(group_shards(model, strategy), dims, strategy, cfg)
    out += tp_collectives(model, cfg, dims["tp"])
    world = dist.get_world_size()
    if world > 1:  # parallel.train_utils.clip_grad_norm_: one fp64 sum of squares
        out.append(Collective(labels[dist.group.WORLD.group_name], "all_reduce", 8, world))
    return out


# ---------------------------------------------------------------- memory


def activation_bytes(model, cfg: StepConfig, tp: int) -> int:
    """What autograd keeps for backward, per rank, for one micro-batch of B sequences of
    length s (b = bytes of the compute dtype, h = dim, t = tp, s' = s/t with sequence
    parallelism else s, q/kv = this rank's query/kv width, f = ffn_hidden/t, V = vocab):

      per block   2 norms:            2 (4 + b) B s' h   (fp32 copy of x, normed x)
                  2 region inputs:    2 b B s h          (full-sequence input of the column linears)
                  attention:          b B s (q + 2 kv)   (q, k, v after RoPE)
                                    + 2 b B s q          (output, and its reshaped copy read by wo)
                                    + 4 B (heads/t) s    (log-sum-exp: flash and flex kernels keep
                                                          no s x s scores; see attention_workspace_bytes)
                  MLP:                4 b B s f          (w1 out, silu, w3 out, product)
      checkpointed block:             b B s' h           (its input; one block is recomputed at a time)
      head:       norm + region input + `loss_bytes`
    """
    args = model.args
    layout = model.layers[0].attention.layout
    b, B, s, h = cfg.compute_bytes, cfg.batch, cfg.seq_len, args.dim
    s_local = s // tp if cfg.sequence_parallel and tp > 1 else s
    q, kv = layout.n_local_heads * args.head_dim, layout.n_local_kv_heads * args.head_dim
    f = args.ffn_hidden_dim // tp
    norm = (4 + b) * B * s_local * h
    region = b * B * s * h
    attention = b * B * s * (q + 2 * kv) + 2 * b * B * s * q + 4 * B * layout.n_local_heads * s
    block = 2 * norm + 2 * region + attention + 4 * b * B * s * f
    recomputed = len(checkpointed_blocks(args.n_layers, cfg.activation_checkpointing))
    blocks = (args.n_layers - recomputed) * block + recomputed * b * B * s_local * h + (block if recomputed else 0)
    return blocks + norm + region + loss_bytes(args, cfg, tp)


def loss_bytes(args: ModelArgs, cfg: StepConfig, tp: int) -> int:
    """Logits and loss at the start of backward, when every activation is still held
    (T = B s tokens, V/t vocabulary columns on this rank):
      tp 1: chunked cross-entropy keeps the compute-dtype logits, writes their gradient
            beside them, and builds fp32 probabilities one chunk at a time: 2 b T V + chunk
      tp > 1: the vocab-parallel loss keeps fp32 exp(logits - max); its backward builds
            fp32 probabilities and their compute-dtype cast: (4 + 4 + b) T V/t"""
    tokens, vocab, b = cfg.batch * cfg.seq_len, args.vocab_size, cfg.compute_bytes
    if tp == 1:
        chunk_tokens = min(tokens, max(1, CROSS_ENTROPY_CHUNK_BYTES // (4 * vocab)))
        return 2 * b * tokens * vocab + 4 * chunk_tokens * vocab
    return (8 + b) * tokens * vocab // tp


def attention_workspace_bytes(model, cfg: StepConfig) -> int:
    """The fused attention kernels' memory beyond the saved activations. Flash (SDPA, causal)
    and flex (document-masked) attention never hold s x s scores: their forward saves only the
    fp32 log-sum-exp (B x heads x s, in activation_bytes). Their backward, one block at a
    time, accumulates dq in fp32 (4 B s q) beside the fp32 row sums of dO * O (4 B heads s),
    and under GQA writes dk and dv per query head before summing them per kv head
    (2 b B s q). A document block mask lives for the whole step: four int32 tensors
    (block counts and indices, full and partial blocks, forward and transposed) of
    B x ceil(s / 128)^2."""
    args = model.args
    layout = model.layers[0].attention.layout
    b, B, s = cfg.compute_bytes, cfg.batch, cfg.seq_len
    q = layout.n_local_heads * args.head_dim
    workspace = 4 * B * s * q + 4 * B * layout.n_local_heads * s
    if layout.n_local_heads != layout.n_local_kv_heads:
        workspace += 2 * b * B * s * q
    blocks = -(-s // FLEX_BLOCK)
    mask = 4 * 4 * B * blocks * blocks if cfg.document_masking else 0
    return workspace + mask


def gathered_param_bytes(groups, shard: int, strategy, cfg: StepConfig) -> int:
    """Peak of unsharded parameters: with resharding, the groups that stay gathered plus two
    blocks (the one computing and the one being prefetched); without, the whole tp shard of
    the model at the end of forward."""
    sizes = [(numel * shard * cfg.compute_bytes, reshard) for _, numel, reshard in groups]
    if not strategy.reshard_after_forward:
        return sum(size for size, _ in sizes)
    kept = sum(size for size, reshard in sizes if not reshard)
    resharded = sorted((size for size, reshard in sizes if reshard), reverse=True)
    return kept + sum(resharded[:2])


def fsdp_gradient_buffers(groups, shard: int, cfg: StepConfig) -> tuple:
    """(unsharded gradients, reduce-scatter buffer) at the peak of backward. FSDP2 computes a
    group's gradients unsharded in the compute dtype (bf16 under mixed precision), then copies
    them into one reduce-dtype (fp32) buffer of the unsharded size for the reduce-scatter,
    which overlaps the next group's backward: so one group's unsharded gradients plus one
    fp32 buffer. The root group (a tied embedding and the final norm) is reduced only when
    the whole backward ends, so its unsharded gradients stay meanwhile."""
    unsharded = {name: numel * shard for name, numel, _ in groups}
    root = unsharded.pop("root", 0)
    largest = max(unsharded.values(), default=root)
    return cfg.compute_bytes * (root + largest), 4 * max(largest, root)


def communicators(dims: dict) -> int:
    """NCCL communicators a rank holds: one per mesh dimension of more than one rank, the
    flattened dp of a hybrid mesh, and the world's (the gradient norm's all-reduce)."""
    sizes = [n for n in dims.values() if n > 1]
    world = math.prod(dims.values())
    count = len(sizes)
    if dims.get("dp_replicate", 1) > 1 and dims.get("dp_shard", 1) > 1:
        count += 1
    if world > 1 and world not in sizes:
        count += 1
    return count


def memory_bytes(model, groups, shard: int, strategy, cfg: StepConfig, dims: dict) -> dict:
    """Every memory term of one rank, bytes; `allocated_bytes` is their peak as the caching
    allocator counts it, `total_bytes` what the GPU must hold."""
    params = sum(numel for _, numel, _ in groups)
    unsharded_grads, reduce_scatter = fsdp_gradient_buffers(groups, shard, cfg)
    allocated = {
        "param_bytes": params * 4,
        "grad_bytes": params * 4,
        "optimizer_bytes": params * 8,
        "master_bytes": 0,
        "gathered_param_bytes": gathered_param_bytes(groups, shard, strategy, cfg),
        "unsharded_grad_bytes": unsharded_grads,
        "reduce_scatter_bytes": reduce_scatter,
        "activation_bytes": activation_bytes(model, cfg, dims["tp"]),
        "attention_workspace_bytes": attention_workspace_bytes(model, cfg),
    }
    total = sum(allocated.values())
    outside = {
        "allocator_slack_bytes": round(ALLOCATOR_SLACK * total),
        "cuda_context_bytes": CUDA_CONTEXT_BYTES,
        "nccl_bytes": CUDA_NCCL_BYTES_PER_GROUP * communicators(dims),
    }
    return {**allocated, "allocated_bytes": total, **outside, "total_bytes": total + sum(outside.values())}


def largest_micro_batch(model, groups, shard: int, strategy, cfg: StepConfig, dims: dict, gpu_bytes: int) -> int:
    """The most sequences per micro-step whose total fits in `gpu_bytes`; 0 when one does not.
    Memory grows with the batch, so double, then bisect."""

    def fits(batch: int) -> bool:
        return memory_bytes(model, groups, shard, strategy, replace(cfg, batch=batch), dims)["total_bytes"] <= gpu_bytes

    if not fits(1):
        return 0
    low = 1
    while fits(2 * low) and low < 2**20:
        low *= 2
    high = 2 * low  # fits(low) and not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def plan_strategy(model, mesh: DeviceMesh, strategy_name: str, cfg: StepConfig, gpu_memory: Optional[float] = None) -> dict:
    """The per-rank plan of one strategy for a model built by build_parallel_model;
    `gpu_memory` (GiB) adds whether it fits and the largest micro-batch that does."""
    strategy = get_strategy(strategy_name)
    dims = {name: mesh[name].size() for name in mesh.mesh_dim_names}
    groups = group_shards(model, strategy)
    params = sum(numel for _, numel, _ in groups)
    shard = dims["dp_shard" if strategy.hybrid else "dp"]
    collectives = step_collectives(model, mesh, strategy, cfg)
    comm = summarize(collectives)
    memory = memory_bytes(model, groups, shard, strategy, cfg, dims)
    fit = {}
    if gpu_memory is not None:
        gpu_bytes = round(gpu_memory * GIB)
        fit = {
            "gpu_memory_bytes": gpu_bytes,
            "fits": memory["total_bytes"] <= gpu_bytes,
            "max_micro_batch": largest_micro_batch(model, groups, shard, strategy, cfg, dims, gpu_bytes),
        }
    return {
        "strategy": strategy_name,
        "mesh": dims,
        "params_per_rank": params,
        **memory,
        **fit,
        "comm": comm,
        "comm_wire_bytes": {dim: sum(op["wire_bytes"] for op in ops.values()) for dim, ops in comm.items()},
    }


# ---------------------------------------------------------------- the fake world


def init_fake_world(world_size: int) -> None:
    """A process group of `world_size` ranks that sends nothing; this process is rank 0."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("init_fake_world: a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def default_dp_replicate(dp: int) -> int:
    """Two replica groups when dp splits in two, so the hybrid columns show replication."""
    return 2 if dp % 2 == 0 else 1


def plan(
    args: ModelArgs,
    world_size: int,
    tp: int,
    dp_replicate: Optional[int] = None,
    cfg: StepConfig = StepConfig(),
    strategies=tuple(STRATEGIES),
    gpu_memory: Optional[float] = None,
) -> dict:
    """{strategy: plan} on a fake world of `world_size` ranks (or the process group this
    process already has). Hybrid strategies use `dp_replicate` replica groups (default:
    `default_dp_replicate`). `gpu_memory` (GiB per GPU) adds fits / max_micro_batch."""
    mesh_shape(world_size, tp)  # one clear error before anything is built
    own_world = not dist.is_initialized()
    if own_world:
        init_fake_world(world_size)
    try:
        if dist.get_world_size() != world_size:
            raise ValueError(f"plan: the process group has {dist.get_world_size()} ranks, not {world_size}")
        dp = world_size // tp
        dp_replicate = dp_replicate or default_dp_replicate(dp)
        mesh_shape(world_size, tp, dp_replicate, hybrid=True)
        results, built = {}, {}
        for name in strategies:
            hybrid = get_strategy(name).hybrid
            if hybrid not in built:  # full/grad_op and the two hybrids shard alike
                mesh = build_mesh(tp, dp_replicate if hybrid else 1, hybrid=hybrid, device="cpu")
                model = build_parallel_model(
                    args,
                    mesh,
                    strategy=name,
                    sequence_parallel=cfg.sequence_parallel,
                    mixed_precision=cfg.mixed_precision,
                    activation_checkpointing=cfg.activation_checkpointing,
                    materialize=False,
                )
                built[hybrid] = (model, mesh)
            model, mesh = built[hybrid]
            results[name] = plan_strategy(model, mesh, name, cfg, gpu_memory)
        return results
    finally:
        if own_world:
            dist.destroy_process_group()


# ---------------------------------------------------------------- command line


def _gib(n) -> str:
    return f"{n / GIB:.2f}"


def format_table(results: dict, header: str) -> str:
    names = list(results)
    rows = [("", names)]

    def row(label, values):
        rows.append((label, [str(v) for v in values]))

    row("mesh", ["x".join(str(v) for v in r["mesh"].values()) for r in results.values()])
    row("params / rank", [f"{r['params_per_rank']:,}" for r in results.values()])
    for key, label in MEMORY_ROWS:
        row(label, [_gib(r[key]) for r in results.values()])
    if all("fits" in r for r in results.values()):
        row(f"fits in {_gib(next(iter(results.values()))['gpu_memory_bytes'])} GiB",
            ["yes" if r["fits"] else "no" for r in results.values()])
        row("largest micro-batch that fits", [r["max_micro_batch"] for r in results.values()])
    dims = sorted({d for r in results.values() for d in r["comm"]}, key=["tp", "dp", "dp_shard", "dp_replicate", "world"].index)
    for dim in dims:
        ops = sorted({op for r in results.values() for op in r["comm"].get(dim, {})})
        for op in ops:
            cells = []
            for r in results.values():
                entry = r["comm"].get(dim, {}).get(op)
                cells.append("-" if entry is None else f"{entry['calls']} x, {_gib(entry['wire_bytes'])}")
            row(f"{dim} {op} (calls, GiB sent)", cells)
    width = max(len(label) for label, _ in rows)
    col = max(max(len(c) for c in cells) for _, cells in rows) + 2
    lines = [header]
    for label, cells in rows:
        lines.append(label.ljust(width) + "".join(c.rjust(col) for c in cells))
    return "\n".join(lines)


MEMORY_ROWS = [
    ("param_bytes", "params fp32 (GiB)"),
    ("grad_bytes", "grads fp32 (GiB)"),
    ("optimizer_bytes", "AdamW m+v fp32 (GiB)"),
    ("master_bytes", "extra fp32 master (GiB)"),
    ("gathered_param_bytes", "gathered params peak (GiB)"),
    ("unsharded_grad_bytes", "unsharded grads (GiB)"),
    ("reduce_scatter_bytes", "fp32 reduce-scatter buffer (GiB)"),
    ("activation_bytes", "activations (GiB)"),
    ("attention_workspace_bytes", "attention workspace (GiB)"),
    ("allocated_bytes", "= allocated peak (GiB)"),
    ("allocator_slack_bytes", "allocator slack (GiB)"),
    ("cuda_context_bytes", "CUDA context (GiB)"),
    ("nccl_bytes", "NCCL buffers (GiB)"),
    ("total_bytes", "= total (GiB)"),
]


def parse_args(argv=None) -> argparse.Namespace:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="python -m parallel.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=f"preset (required): {', '.join(PRESETS)}")
    p.add_argument("--nodes", type=int, default=1, help="machines (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="processes per machine (default: %(default)s)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: --gpus-per-node)")
    p.add_argument("--dp-replicate", type=int, default=None,
        help="HSDP replica groups (default: 2 when dp is even, else 1)")
    p.add_argument("--seq-len", type=int, default=d["seq_len"], help="tokens per sequence (default: %(default)s, as train.py)")
    p.add_argument("--micro-batch", "--batch", dest="batch", type=int, default=d["batch"],
        help="sequences per dp rank per micro-step (default: %(default)s, as train.py)")
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"],
        help="micro-steps per optimizer step (default: %(default)s)")
    p.add_argument("--strategy", default=d["strategy"],
        help=f"the one --json reports at top level: {', '.join(STRATEGIES)} (default: %(default)s)")
    p.add_argument("--dtype", "--mixed-precision", dest="mixed_precision", default=d["mixed_precision"],
        choices=["bf16", "fp32"], help="compute dtype (default: %(default)s, train.py's on CUDA)")
    p.add_argument("--activation-checkpointing", default=d["activation_checkpointing"], choices=["none", "full", "selective"],
        help="blocks recomputed in backward (default: %(default)s)")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=d["sequence_parallel"],
        help="split activations along the sequence between blocks when tp > 1 (default: off, as train.py)")
    p.add_argument("--document-masking", action=argparse.BooleanOptionalAction, default=d["document_masking"],
        help="attention within documents: flex attention's block mask on CUDA (default: on, as train.py)")
    p.add_argument("--gpu-memory", type=float, default=None,
        help="GiB per GPU (an 80 GB H100 reports 79.1): say whether the plan fits, and the largest "
             "micro-batch that does (default: not asked)")
    p.add_argument("--json", action="store_true",
        help="print the plan as JSON instead of a table (default: table)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    try:
        if opts.model not in PRESETS:
            raise ValueError(f"unknown --model {opts.model!r}; choose one of {', '.join(PRESETS)}")
        get_strategy(opts.strategy)
        if opts.gpu_memory is not None and opts.gpu_memory <= 0:
            raise ValueError(f"--gpu-memory {opts.gpu_memory} must be a positive number of GiB, e.g. 79.1 for an H100")
        world = opts.nodes * opts.gpus_per_node
        tp = opts.tp or opts.gpus_per_node
        dp = mesh_shape(world, tp)["dp"]
        dp_replicate = opts.dp_replicate or default_dp_replicate(dp)
        cfg = StepConfig(
            seq_len=opts.seq_len,
            batch=opts.batch,
            grad_accum=opts.grad_accum,
            sequence_parallel=opts.sequence_parallel and tp > 1,
            mixed_precision=opts.mixed_precision,
            activation_checkpointing=opts.activation_checkpointing,
            document_masking=opts.document_masking,
        )
        args = PRESETS[opts.model]
        results = plan(args, world, tp, dp_replicate, cfg, gpu_memory=opts.gpu_memory)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokens = opts.batch * opts.seq_len * dp * opts.grad_accum
    chosen = results[opts.strategy]
    if opts.json:
        report = {
            "model": opts.model,
            "world_size": world,
            "tp": tp,
            "dp": dp,
            "dp_replicate": dp_replicate,
            "tokens_per_step": tokens,
            **{k: v for k, v in vars(cfg).items()},
            **chosen,
            "strategies": results,
        }
        print(json.dumps(report, indent=1))
        return 0
    header = (
        f"{opts.model} on {opts.nodes} x {opts.gpus_per_node} = {world} ranks, tp {tp}, dp {dp} "
        f"(hybrid: {dp_replicate} replicas x {dp // dp_replicate}); per rank, per step of {tokens:,} tokens "
        f"(seq {opts.seq_len}, micro-batch {opts.batch}/dp rank, grad_accum {opts.grad_accum}); "
        f"{cfg.mixed_precision}, sequence parallel {'on' if cfg.sequence_parallel else 'off'}, "
        f"activation checkpointing {cfg.activation_checkpointing}, "
        f"document masking {'on' if cfg.document_masking else 'off'}"
    )
    print(format_table(results, header))
    if "fits" in chosen:
        print(fits_line(opts.strategy, chosen))
    return 0


def fits_line(strategy: str, result: dict) -> str:
    verdict = "fits" if result["fits"] else "does not fit"
    need, have = _gib(result["total_bytes"]), _gib(result["gpu_memory_bytes"])
    largest = result["max_micro_batch"]
    most = f"the largest micro-batch that fits is {largest}" if largest else "not even micro-batch 1 fits"
    return f"{strategy}: {verdict} ({need} of {have} GiB); {most}"


if __name__ == "__main__":
    sys.exit(main())
