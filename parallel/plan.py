"""Memory, communication and step-time planner for training with FSDP2 over dp, tensor
parallelism over tp and, planned ahead of train.py, pipeline parallelism over pp and
context parallelism over cp.

    python -m parallel.plan --model 3.1-405b --nodes 16 --gpus-per-node 8 [--json]
    python -m parallel.plan --model 3.1-405b --nodes 1024 --tp 8 --pp 16 --pp-microbatches 32 \\
        --seq-len 8192 --micro-batch 1 --activation-checkpointing full --gpu-memory 79.1

It builds the real model with `build_parallel_model` on the meta device, on a fake
process group of the ranks of one pipeline stage (the world size over pp; nothing is
allocated, nothing is sent), and reads rank 0's shard shapes off the DTensors; rank 0
holds the largest shards when a size does not divide evenly. From them, per rank and per
optimizer step:

  params        the fp32 shards (with bf16 mixed precision they are the master weights;
                FSDP2 keeps no second copy)
  grads         fp32 shards of the same size
  optimizer     AdamW m and v, fp32
  gathered      peak of the unsharded (compute-dtype) parameters FSDP holds at once
  unsharded grads, reduce-scatter
                FSDP2's gradient of the block computing (compute dtype, unsharded) and
                the fp32 reduce-scatter input of the block being reduced
  activations   see `activation_bytes`
  cp K/V        with cp > 1: the all-gathered keys and values kept for backward
  attention     the fused kernel's backward workspace and the document block mask
  = allocated   what torch.cuda.max_memory_allocated() should show
  + slack, CUDA context, NCCL buffers (outside the allocator's count; see the constants)
  = total       what must fit in the GPU's memory (`--gpu-memory`)
  comm          every collective of a training step, per mesh dimension: count, payload
                bytes (all-gather: gathered output; reduce-scatter: input; all-reduce:
                the tensor; send: the tensor) and bytes each rank sends on a ring
                ((n-1)/n of the payload, twice that for an all-reduce)
  estimate      the step time from FLOPs, link bandwidths and the pipeline bubble; see
                `step_estimate` and the hardware constants

4-D (`--pp P`, `--cp C`; docs/4d-parallelism.md): the mesh is ("pp", "dp_replicate",
"dp_shard", "cp", "tp"), tp innermost; FSDP shards each stage's parameters over
dp_shard x cp (context-parallel ranks see different tokens, so for FSDP they are data
parallel). A pp rank holds the parameters of its stage(s), the activations of the
micro-batches its schedule has in flight, and with cp each rank holds seq/C tokens of
a sequence plus the whole sequence's keys and values. Ranks of different stages differ,
so the plan reports the pp rank with the largest total. train.py does not run pp or cp
yet; the planner assumes the engines it will use (torch.distributed.pipelining, an
all-gather context parallelism as in Llama 3) and says so where it matters.

`CommCounter` records the same quantities from a real run, so tests can hold the
planner to what actually happens. The defaults are train.py's (tests/test_plan.py holds
them equal), with bf16 because that is train.py's default on CUDA.
"""

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode

from llama.config import PRESETS, ModelArgs

from .context import check_cp_divides, check_sequence_parallel_divides
from .fsdp import STRATEGIES, build_parallel_model, checkpointed_blocks, fsdp_groups, get_strategy
from .layers import CROSS_ENTROPY_CHUNK_BYTES
from .mesh import build_mesh, dp_mesh, is_hybrid, mesh_shape
from .pipeline import PipelineConfig, add_pipeline_arguments, check_pipeline, stage_layer_counts

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

# The step-time estimate's hardware: H100 SXM nodes of 8 GPUs, the cluster of the Llama 3
# paper. Assumptions, not fitted to any training run:
# NVIDIA's H100 SXM datasheet: 989 TFLOP/s dense bf16 (1979 is with 2:4 sparsity)
PEAK_TFLOPS = 989.0
# The fraction of that peak the step's kernels are assumed to sustain: 794.5 TFLOP/s, the
# best bf16 matmul Stas Bekman's Maximum Achievable Matmul FLOPS finder measured on an H100
# SXM (ml-engineering, compute/accelerator, torch 2.7): a ceiling, which attention and
# the memory-bound kernels (norms, SwiGLU, RoPE, loss) stay below
COMPUTE_EFFICIENCY = 0.80
# NVLink 4 inside a node: 900 GB/s per GPU, both directions together. A ring step sends and
# receives at once, so the bytes a rank sends move at half of it
NVLINK_BYTES_PER_S = 450e9
# Between nodes: one 400 Gb/s NIC per GPU (InfiniBand or RoCE), 50 GB/s each way
NETWORK_BYTES_PER_S = 50e9


# ---------------------------------------------------------------- collectives


@dataclass(frozen=True)
class Collective:
    dim: str  # mesh dimension, or "world"
    op: str  # all_gather | reduce_scatter | all_reduce | send (pipeline point-to-point)
    bytes: int  # payload: gathered output / scattered input / reduced tensor / sent tensor
    group_size: int

    @property
    def wire_bytes(self) -> float:
        """Bytes one rank sends on a ring (a point-to-point send: the tensor)."""
        if self.op == "send":
            return self.bytes
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
    seq_len=256, batch=4, grad_accum=1, strategy="full", sequence_parallel=True, mixed_precision="bf16",
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

    @classmethod
    def from_options(cls, opts: argparse.Namespace) -> "StepConfig":
        """What train.py's flags run on a GPU (bf16 unless --dtype says otherwise)."""
        return cls(opts.seq_len, opts.micro_batch, opts.grad_accum, opts.sequence_parallel, opts.dtype or "bf16",
                   opts.activation_checkpointing, opts.document_masking)


# ---------------------------------------------------------------- the 4-D layout

@dataclass(frozen=True)
class Hardware:
    """What the step-time estimate assumes; see the constants for the sources."""

    peak_tflops: float = PEAK_TFLOPS
    compute_efficiency: float = COMPUTE_EFFICIENCY
    gpus_per_node: int = 8
    nvlink_bytes_per_s: float = NVLINK_BYTES_PER_S
    network_bytes_per_s: float = NETWORK_BYTES_PER_S

    def bandwidth(self, span: int) -> float:
        """Bytes per second a rank sends in a group whose ranks lie within `span`
        consecutive ranks: NVLink when that fits in a node, else the network."""
        inside = span <= self.gpus_per_node and self.gpus_per_node % span == 0
        return self.nvlink_bytes_per_s if inside else self.network_bytes_per_s


@dataclass(frozen=True)
class Layout:
    """The dimensions beyond the (dp, tp) mesh the model is built on: pp and cp sizes,
    the pipeline schedule, and the hardware of the estimate."""

    pp: int = 1
    cp: int = 1
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    hardware: Hardware = field(default_factory=Hardware)

    @property
    def microbatches(self) -> int:
        """Pipeline micro-batches per optimizer step (1 without a pipeline: train.py's
        micro-steps are grad_accum)."""
        if self.pp == 1:
            return 1
        return self.pipeline.microbatches or self.pp

    @property
    def virtual_stages(self) -> int:
        return self.pipeline.virtual_stages if self.pp > 1 else 1


@dataclass(frozen=True)
class PipelineRank:
    """What one pp rank holds and runs: its stages (rank, rank + pp, ... with virtual
    stages), their layers, and the stage of each forward whose activations it holds at its
    peak."""

    rank: int
    stages: tuple
    stage_layers: tuple  # a range of global block indices per stage
    first: bool  # holds stage 0: the embedding
    last: bool  # holds the last stage: the final norm, the LM head and the loss
    in_flight: tuple

    @property
    def layers(self) -> list:
        return [layer for layers in self.stage_layers for layer in layers]

    def layers_of(self, stage: int) -> range:
        return self.stage_layers[self.stages.index(stage)]


def forwards_in_flight(rank: int, pp: int, microbatches: int, virtual_stages: int) -> tuple:
    """The stage of each forward whose activations `rank` holds at its peak, in order.
    Schedule1F1B runs min(m, pp - rank) forwards of its stage before its first backward,
    then a backward before each forward. ScheduleInterleaved1F1B runs its warm-up, (v - 1)
    rounds of micro-batches plus 2 per hop to the last rank, walking its stages round by
    round, then a forward before each backward: one more. (The steady state adds one and
    frees one.)"""
    if virtual_stages == 1:
        return (rank,) * min(microbatches, pp - rank)
    rounds = max(1, microbatches // pp)
    per_round = microbatches // rounds
    total = microbatches * virtual_stages
    warmup = min((virtual_stages - 1) * per_round + 2 * (pp - 1 - rank), total)
    held = min(warmup + 1, total)
    return tuple(((i // per_round) % virtual_stages) * pp + rank for i in range(held))


def pipeline_ranks(n_layers: int, layout: Layout) -> list:
    """One PipelineRank per pp rank; without a pipeline, one that holds everything."""
    pp, v = layout.pp, layout.virtual_stages
    counts = stage_layer_counts(n_layers, pp * v, layout.pipeline.fewer_end_layers)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    ranks = []
    for rank in range(pp):
        stages = tuple(rank + k * pp for k in range(v))
        ranks.append(PipelineRank(
            rank=rank,
            stages=stages,
            stage_layers=tuple(range(starts[s], starts[s] + counts[s]) for s in stages),
            first=0 in stages,
            last=pp * v - 1 in stages,
            in_flight=forwards_in_flight(rank, pp, layout.microbatches, v),
        ))
    return ranks


def pipeline_bubble(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """The idle fraction of a pipelined step whose stages take equal time t per micro-batch,
    with m >= p micro-batches: (p-1)/(m+p-1) for 1F1B (the fill and the drain each leave a
    rank idle for p - 1 stage times, (p-1) t against m t of work). Interleaved with v stages
    per rank, a micro-batch's work on a rank comes in v pieces of t/v, and the fill and the
    drain wait for p - 1 pieces, not p - 1 stages: (p-1) t/v idle against m t of work, so
    (p-1)/(v m + p - 1). (With m < p the interleaved schedule idles more; check_layout
    refuses it.)"""
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)


def check_layout(args: ModelArgs, world_size: int, tp: int, cfg: StepConfig, layout: Layout) -> int:
    """The data-parallel size (ranks that see different sequences), after checking the
    4-D shape; each problem is one line naming the flag."""
    pp, cp, pipeline = layout.pp, layout.cp, layout.pipeline
    mesh_shape(world_size, tp, cp=cp, pp=pp)  # the mesh train.py would build: same checks, same messages
    check_cp_divides(cfg.seq_len, cp)
    check_sequence_parallel_divides(cfg.seq_len, cp, tp, cfg.sequence_parallel)
    check_pipeline(args, pp, pipeline)
    return world_size // (pp * cp * tp)


def mesh_dims(built: dict, layout: Layout) -> dict:
    """The mesh's dimension sizes in order ("pp", "dp_replicate", "dp_shard" or "dp", "cp",
    "tp"), from the (dp x cp, tp) mesh the model was built on; pp and cp appear when more
    than 1, so a 2-D plan names exactly its 2-D mesh."""
    dims = {"pp": layout.pp} if layout.pp > 1 else {}
    for name, size in built.items():
        if name in ("dp", "dp_shard"):
            size //= layout.cp
        if name == "tp" and layout.cp > 1:
            dims["cp"] = layout.cp
        dims[name] = size
    return dims


def group_span(label: str, dims: dict) -> int:
    """How many consecutive ranks a group of this dimension spreads over (tp innermost,
    pp outermost): the group fits in a node when that many do."""
    inner = 1
    spans = {}
    for name in reversed(list(dims)):
        inner *= dims[name]
        spans[name] = inner
    if label.endswith(" x cp"):  # FSDP's group: dp (or dp_shard) and cp together
        label = label[: -len(" x cp")]
    return spans.get(label, math.prod(dims.values()))  # "world" and the hybrid's flat "dp"


# ---------------------------------------------------------------- the collectives of a step


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


def whole_model(n_layers: int) -> PipelineRank:
    """The one 'stage' of a run without a pipeline."""
    return PipelineRank(0, (0,), (range(n_layers),), True, True, (0,))


def stage_groups(groups, rank: PipelineRank) -> list:
    """The FSDP groups on a pp rank: its blocks, the embedding on the first stage, the
    final norm and LM head on the last (and the root, which only a whole model has)."""
    layers = set(rank.layers)
    whole = rank.first and rank.last
    kept = []
    for group in groups:
        name = group[0]
        if (name.startswith("layers.") and int(name.split(".")[1]) in layers) or (
            (name == "tok_embeddings" and rank.first) or (name == "norm+output" and rank.last) or (name == "root" and whole)
        ):
            kept.append(group)
    return kept


def _on_rank(param_name: str, rank: PipelineRank) -> bool:
    if param_name.startswith("layers."):
        return int(param_name.split(".")[1]) in set(rank.layers)
    if param_name.startswith("tok_embeddings."):
        return rank.first
    return rank.last  # the final norm and the LM head


def fsdp_collectives(groups, dims: dict, shard: int, strategy, cfg: StepConfig, pipelined_microbatches: int = 0) -> list:
    """Per optimizer step. Without a pipeline, per micro-step: each group is gathered in
    forward (and again in backward when it was resharded), its gradients reduce-scattered,
    and for HSDP all-reduced across replicas.

    Under a pipeline of m micro-batches, torch.distributed.pipelining keeps a group
    gathered from its first backward to the end of the step and its gradients unsharded
    (`set_reshard_after_backward(False)`, `set_requires_gradient_sync(False)`), and reduces
    them once after the last backward. Forward does not reshard either: build_pipeline runs
    the resharding strategies as their keep-gathered twins (parallel.pipeline.
    PIPELINE_STRATEGY), since resharding would gather the group again for every
    micro-batch (m + 1 gathers). So: one gather, one reduce-scatter (and HSDP all-reduce)
    per group.

    FSDP skips the all-gather and reduce-scatter on a one-rank shard group. The shard group
    is dp (dp_shard for HSDP) times cp: context-parallel ranks hold different tokens."""
    label = "dp_shard" if strategy.hybrid else "dp"
    if dims.get("cp", 1) > 1:
        label += " x cp"
    out = []
    for _, numel, reshard in groups:
        if shard > 1:
            gathered = Collective(label, "all_gather", shard * numel * cfg.compute_bytes, shard)
            if pipelined_microbatches:
                out.append(gathered)
            else:
                out += [gathered] * (2 if reshard else 1)
            out.append(Collective(label, "reduce_scatter", shard * numel * 4, shard))
        if strategy.hybrid:
            out.append(Collective("dp_replicate", "all_reduce", numel * 4, dims["dp_replicate"]))
    return out * cfg.grad_accum


def tp_collectives(model, cfg: StepConfig, tp: int, rank: Optional[PipelineRank] = None, cp: int = 1,
                   microbatches: int = 1) -> list:
    """Per optimizer step, the tensor-parallel layers' collectives. Per micro-batch
    (Megatron's minimum): per block 2 in forward, 2 in backward, each an all-reduce of the
    (batch, seq/cp, dim) activation, or a reduce-scatter + all-gather pair with sequence
    parallelism; the forward of recomputed blocks again up to w2; the embedding's on the
    first stage; the head's and the loss's small all-gather on the last. Per micro-step
    without a pipeline, once per step with one: the all-reduce of each gradient the tp ranks
    computed in part (kv projections shared when tp > n_kv_heads), which FSDP does when it
    reduces. Per micro-batch, under sequence parallelism: each norm weight's fp32 all-reduce
    in backward (parallel/layers.py sequence_parallel_weight)."""
    if tp == 1:
        return []
    args = model.args
    rank = rank or whole_model(args.n_layers)
    seq = cfg.seq_len // cp
    act = cfg.batch * seq * args.dim * cfg.compute_bytes
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
    checkpointed = set(checkpointed_blocks(args.n_layers, cfg.activation_checkpointing))
    recomputed = sum(1 for layer in rank.layers if layer in checkpointed)
    out = leave("fwd") + leave("bwd") if rank.first else []  # embedding
    out += (block_fwd + block_bwd) * len(rank.layers) + recompute * recomputed
    if rank.last:
        out += enter("fwd") + enter("bwd")  # output head
        tokens = cfg.batch * seq
        out.append(Collective("tp", "all_gather", tp * 2 * tokens * 4, tp))  # loss: (log-sum-exp, target logit) fp32

    partial, norms = [], []
    for name, param in model.named_parameters():
        shared_kv = name.endswith(("wk.weight", "wv.weight")) and not model.layers[0].attention.layout.kv_sharded
        if sp and name.endswith("norm.weight") and _on_rank(name, rank):
            norms.append(Collective("tp", "all_reduce", param.numel() * 4, tp))  # in fp32, in each backward
        elif shared_kv and _on_rank(name, rank):
            partial.append(Collective("tp", "all_reduce", param.numel() * cfg.compute_bytes, tp))
    return ((out + norms) * microbatches + partial) * cfg.grad_accum


def cp_collectives(model, cfg: StepConfig, cp: int, rank: PipelineRank, microbatches: int) -> list:
    """Per optimizer step, context parallelism as in Llama 3: each block all-gathers its
    keys and values over cp in forward (again when recomputed), and reduce-scatters their
    gradients in backward; each payload is the whole sequence's K (or V) for this rank's
    kv heads. (The document ids' one small gather per micro-batch is left out.)"""
    if cp == 1:
        return []
    args = model.args
    layout = model.layers[0].attention.layout
    payload = cfg.compute_bytes * cfg.batch * cfg.seq_len * layout.n_local_kv_heads * args.head_dim
    gather = [Collective("cp", "all_gather", payload, cp)] * 2  # K and V
    scatter = [Collective("cp", "reduce_scatter", payload, cp)] * 2
    checkpointed = set(checkpointed_blocks(args.n_layers, cfg.activation_checkpointing))
    recomputed = sum(1 for layer in rank.layers if layer in checkpointed)
    per_microbatch = (gather + scatter) * len(rank.layers) + gather * recomputed
    return per_microbatch * microbatches * cfg.grad_accum


def pp_collectives(model, cfg: StepConfig, dims: dict, rank: PipelineRank, n_stages: int, microbatches: int) -> list:
    """Per optimizer step, the pipeline's point-to-point traffic: per micro-batch and stage
    boundary, the stage's output activation forward and its gradient backward, each
    (batch, seq/cp, dim) in the compute dtype, 1/tp of it per rank under sequence
    parallelism (else every tp rank sends its replica)."""
    if n_stages == 1:
        return []
    tp = dims["tp"]
    seq = cfg.seq_len // dims.get("cp", 1)
    if cfg.sequence_parallel and tp > 1:
        seq //= tp
    payload = cfg.batch * seq * model.args.dim * cfg.compute_bytes
    out = []
    for stage in rank.stages:
        if stage < n_stages - 1:
            out.append(Collective("pp", "send", payload, 2))  # activation to the next stage
        if stage > 0:
            out.append(Collective("pp", "send", payload, 2))  # gradient to the previous stage
    return out * microbatches * cfg.grad_accum


def step_collectives(model, groups, dims: dict, shard: int, strategy, cfg: StepConfig, rank: PipelineRank,
                     layout: Layout, world_label: str) -> list:
    """Every collective of one optimizer step of this pp rank: grad_accum x (forward +
    backward of its micro-batches), and the gradient-norm all-reduce. The step's token
    count comes from the data loader, which knows the global batch (no collective); the
    logged loss's dp all-reduce runs only on log steps and is left out."""
    m = layout.microbatches
    out = []
    out += fsdp_collectives(groups, dims, shard, strategy, cfg, pipelined_microbatches=m if layout.pp > 1 else 0)
    out += tp_collectives(model, cfg, dims["tp"], rank, layout.cp, m)
    out += cp_collectives(model, cfg, layout.cp, rank, m)
    out += pp_collectives(model, cfg, dims, rank, layout.pp * layout.virtual_stages, m)
    world = math.prod(dims.values())
    if world > 1:  # parallel.train_utils.clip_grad_norm_: one fp64 sum of squares
        out.append(Collective(world_label, "all_reduce", 8, world))
    return out


# ---------------------------------------------------------------- memory


def block_activation_bytes(model, cfg: StepConfig, tp: int, cp: int = 1) -> tuple:
    """(activations, keys and values) one TransformerBlock keeps for backward, for one
    micro-batch of B sequences of length S, of which a cp rank computes s = S/cp tokens
    (b = bytes of the compute dtype, h = dim, t = tp, s' = s/t with sequence parallelism
    else s, q/kv = this rank's query/kv width, f = ffn_hidden/t):

      2 norms:            2 (4 + b) B s' h   (fp32 copy of x, normed x)
      2 region inputs:    2 b B s h          (full-sequence input of the column linears)
      attention:          b B s q            (q after RoPE)
                        + 2 b B s q          (output, and its reshaped copy read by wo)
                        + 4 B (heads/t) s    (log-sum-exp: flash and flex kernels keep
                                              no s x s scores; see attention_workspace_bytes)
      MLP:                4 b B s f          (w1 out, silu, w3 out, product)
      keys and values:    2 b B S kv         (after RoPE; with cp > 1 all-gathered over cp,
                                              the whole sequence, which attention saves)"""
    args = model.args
    layout = model.layers[0].attention.layout
    b, B, full, h = cfg.compute_bytes, cfg.batch, cfg.seq_len, args.dim
    s = full // cp
    s_local = s // tp if cfg.sequence_parallel and tp > 1 else s
    q, kv = layout.n_local_heads * args.head_dim, layout.n_local_kv_heads * args.head_dim
    f = args.ffn_hidden_dim // tp
    norm = (4 + b) * B * s_local * h
    region = b * B * s * h
    attention = b * B * s * q + 2 * b * B * s * q + 4 * B * layout.n_local_heads * s
    block = 2 * norm + 2 * region + attention + 4 * b * B * s * f
    return block, 2 * b * B * full * kv


def activation_bytes(model, cfg: StepConfig, tp: int, cp: int = 1, rank: Optional[PipelineRank] = None) -> tuple:
    """(activations, keys and values) a rank keeps for backward at its peak: for each
    forward in flight (one without a pipeline; see forwards_in_flight), its stage's blocks,
    a checkpointed block keeping only its input b B s' h; one checkpointed block rebuilt at
    a time; and on the last stage the head: norm + region input + `loss_bytes`."""
    args = model.args
    rank = rank or whole_model(args.n_layers)
    block, kv = block_activation_bytes(model, cfg, tp, cp)
    b, B, s, h = cfg.compute_bytes, cfg.batch, cfg.seq_len // cp, args.dim
    s_local = s // tp if cfg.sequence_parallel and tp > 1 else s
    checkpointed = set(checkpointed_blocks(args.n_layers, cfg.activation_checkpointing))
    activations = keys_values = 0
    for stage in rank.in_flight:
        for layer in rank.layers_of(stage):
            if layer in checkpointed:
                activations += b * B * s_local * h
            else:
                activations += block
                keys_values += kv
    if checkpointed.intersection(rank.layers):
        activations += block
        keys_values += kv
    if rank.last:
        norm = (4 + b) * B * s_local * h
        activations += norm + b * B * s * h + loss_bytes(args, replace(cfg, seq_len=s), tp)
    return activations, keys_values


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


def attention_workspace_bytes(model, cfg: StepConfig, cp: int = 1) -> int:
    """The fused attention kernels' memory beyond the saved activations, for a rank's s =
    S/cp queries against all S keys. Flash (SDPA, causal) and flex (document-masked)
    attention never hold s x S scores: their forward saves only the fp32 log-sum-exp
    (B x heads x s, in activation_bytes). Their backward, one block at a time, accumulates
    dq in fp32 (4 B s q) beside the fp32 row sums of dO * O (4 B heads s), and under GQA
    writes dk and dv per query head before summing them per kv head (2 b B S q). A document
    block mask lives for the whole step: four int32 tensors (block counts and indices, full
    and partial blocks, forward and transposed) of B x ceil(s / 128) x ceil(S / 128)."""
    args = model.args
    layout = model.layers[0].attention.layout
    b, B, full = cfg.compute_bytes, cfg.batch, cfg.seq_len
    s = full // cp
    q = layout.n_local_heads * args.head_dim
    workspace = 4 * B * s * q + 4 * B * layout.n_local_heads * s
    if layout.n_local_heads != layout.n_local_kv_heads:
        workspace += 2 * b * B * full * q
    mask = 4 * 4 * B * -(-s // FLEX_BLOCK) * -(-full // FLEX_BLOCK) if cfg.document_masking else 0
    return workspace + mask


def gathered_param_bytes(groups, shard: int, strategy, cfg: StepConfig, pipelined: bool = False) -> int:
    """Peak of unsharded parameters: with resharding, the groups that stay gathered plus two
    blocks (the one computing and the one being prefetched); without, the whole tp shard of
    the model at the end of forward. Under a pipeline every group of the stage stays
    gathered from its first backward to the end of the step (see fsdp_collectives)."""
    sizes = [(numel * shard * cfg.compute_bytes, reshard) for _, numel, reshard in groups]
    if pipelined or not strategy.reshard_after_forward:
        return sum(size for size, _ in sizes)
    kept = sum(size for size, reshard in sizes if not reshard)
    resharded = sorted((size for size, reshard in sizes if reshard), reverse=True)
    return kept + sum(resharded[:2])


def fsdp_gradient_buffers(groups, shard: int, cfg: StepConfig, pipelined: bool = False) -> tuple:
    """(unsharded gradients, reduce-scatter buffer) at the peak of backward. FSDP2 computes a
    group's gradients unsharded in the compute dtype (bf16 under mixed precision), then copies
    them into one reduce-dtype (fp32) buffer of the unsharded size for the reduce-scatter,
    which overlaps the next group's backward: so one group's unsharded gradients plus one
    fp32 buffer. The root group (a tied embedding and the final norm) is reduced only when
    the whole backward ends, so its unsharded gradients stay meanwhile.

    Under a pipeline the reduction waits for the last micro-batch: FSDP2 accumulates every
    group's unsharded gradients in the reduce dtype (fp32) across micro-batches, beside the
    fresh compute-dtype gradient of the group computing."""
    unsharded = {name: numel * shard for name, numel, _ in groups}
    if pipelined:
        largest = max(unsharded.values())
        fresh = cfg.compute_bytes * largest if cfg.compute_bytes != 4 else 0
        return 4 * sum(unsharded.values()) + fresh, 4 * largest
    root = unsharded.pop("root", 0)
    largest = max(unsharded.values(), default=root)
    return cfg.compute_bytes * (root + largest), 4 * max(largest, root)


def communicators(dims: dict) -> int:
    """NCCL communicators a rank holds: one per mesh dimension of more than one rank, the
    flattened dp of a hybrid mesh, FSDP's dp x cp group, and the world's (the gradient
    norm's all-reduce)."""
    sizes = [n for n in dims.values() if n > 1]
    world = math.prod(dims.values())
    count = len(sizes)
    if dims.get("dp_replicate", 1) > 1 and dims.get("dp_shard", 1) > 1:
        count += 1
    if dims.get("cp", 1) > 1 and dims.get("dp_shard", dims.get("dp", 1)) > 1:
        count += 1
    if world > 1 and world not in sizes:
        count += 1
    return count


def memory_bytes(model, groups, shard: int, strategy, cfg: StepConfig, dims: dict,
                 rank: Optional[PipelineRank] = None) -> dict:
    """Every memory term of one rank, bytes; `allocated_bytes` is their peak as the caching
    allocator counts it, `total_bytes` what the GPU must hold. With cp > 1 the gathered
    keys and values are their own term (`cp_kv_bytes`), else they count as activations."""
    cp = dims.get("cp", 1)
    pipelined = dims.get("pp", 1) > 1
    params = sum(numel for _, numel, _ in groups)
    unsharded_grads, reduce_scatter = fsdp_gradient_buffers(groups, shard, cfg, pipelined)
    activations, keys_values = activation_bytes(model, cfg, dims["tp"], cp, rank)
    allocated = {
        "param_bytes": params * 4,
        "grad_bytes": params * 4,
        "optimizer_bytes": params * 8,
        "master_bytes": 0,
        "gathered_param_bytes": gathered_param_bytes(groups, shard, strategy, cfg, pipelined),
        "unsharded_grad_bytes": unsharded_grads,
        "reduce_scatter_bytes": reduce_scatter,
        "activation_bytes": activations if cp > 1 else activations + keys_values,
    }
    if cp > 1:
        allocated["cp_kv_bytes"] = keys_values
    allocated["attention_workspace_bytes"] = attention_workspace_bytes(model, cfg, cp)
    total = sum(allocated.values())
    outside = {
        "allocator_slack_bytes": round(ALLOCATOR_SLACK * total),
        "cuda_context_bytes": CUDA_CONTEXT_BYTES,
        "nccl_bytes": CUDA_NCCL_BYTES_PER_GROUP * communicators(dims),
    }
    return {**allocated, "allocated_bytes": total, **outside, "total_bytes": total + sum(outside.values())}


def largest_micro_batch(total_bytes: Callable[[int], int], gpu_bytes: int) -> int:
    """The most sequences per micro-batch whose total (`total_bytes(batch)`) fits in
    `gpu_bytes`; 0 when one does not. Memory grows with the batch, so double, then bisect."""

    def fits(batch: int) -> bool:
        return total_bytes(batch) <= gpu_bytes

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


# ---------------------------------------------------------------- step time


def block_params(args: ModelArgs) -> int:
    """Weights of one TransformerBlock: attention, MLP, two norms."""
    kv = args.n_kv_heads * args.head_dim
    return args.dim * (2 * args.dim + 2 * kv) + 3 * args.dim * args.ffn_hidden_dim + 2 * args.dim


def rank_flops(args: ModelArgs, cfg: StepConfig, tp: int, cp: int, rank: PipelineRank) -> float:
    """FLOPs one rank executes per micro-batch: for each of its blocks, per token,
    2 per weight forward and 4 backward, and causal attention's 2 x 2 x heads x head_dim x
    S/2 forward (QK^T and PV; a query meets S/2 keys on average; cp's load-balanced chunks
    keep that true per cp rank), twice that backward; a recomputed block's forward once more;
    the LM head's 6 x vocab x dim per token on the last stage; all split over tp."""
    tokens = cfg.batch * cfg.seq_len // cp
    attention_forward = 2 * args.n_heads * args.head_dim * cfg.seq_len  # 4 x S/2
    block_forward = 2 * block_params(args) + attention_forward
    checkpointed = set(checkpointed_blocks(args.n_layers, cfg.activation_checkpointing))
    per_token = sum(3 * block_forward + (block_forward if layer in checkpointed else 0) for layer in rank.layers)
    if rank.last:
        per_token += 6 * args.vocab_size * args.dim
    return tokens * per_token / tp


def _seconds(collectives, dims: dict, hardware: Hardware, ops=None) -> float:
    return sum(c.wire_bytes / hardware.bandwidth(group_span(c.dim, dims)) for c in collectives
               if ops is None or c.op in ops)


def step_estimate(args: ModelArgs, cfg: StepConfig, dims: dict, layout: Layout, ranks: list, comms: list,
                  groups: list, shard: int, strategy) -> dict:
    """Seconds per optimizer step, and the model FLOPs it delivers per GPU. Per pp rank
    (comms[i]: its collectives, groups[i]: its FSDP groups):

      compute   rank_flops x micro-batches / (peak x COMPUTE_EFFICIENCY)
      tp, cp    exposed: each collective's output is the next kernel's input (no async tp)
      bubble    the slowest rank's compute + tp + cp, times (p-1)/(v m), so that the
                pipelined part takes (m + (p-1)/v) micro-batch times
      pp        the sends overlap with compute in the steady state; the fill and the drain
                wait for one send per hop: 2 (p - 1) sends
      dp        FSDP's gathers (and, without a pipeline, its reduce-scatters) overlap with
                compute; what they exceed it by is exposed, and so is the reduction after
                the last backward: one group's (the largest) without a pipeline; under one,
                every group of the stage (pipelining reduces once, after the schedule)
      world     the gradient norm's 8-byte all-reduce: latency, left out; so is the optimizer step

    A collective's time is the bytes a rank sends / the bandwidth of its group: NVLink when
    the group fits in a node (tp innermost, pp outermost), else the network, at full
    bisection bandwidth anywhere, with no per-hop latency. MFU counts the model FLOPs of
    `ModelArgs.training_flops_per_token` (the full S x S attention), HFU the FLOPs the
    kernels execute (causal attention, recomputation included)."""
    hw = layout.hardware
    pp, cp, tp, m, v = layout.pp, layout.cp, dims["tp"], layout.microbatches, layout.virtual_stages
    flops_per_second = hw.peak_tflops * 1e12 * hw.compute_efficiency
    micro_batches = m * cfg.grad_accum
    per_rank = []
    for rank, collectives, rank_groups in zip(ranks, comms, groups):
        compute = micro_batches * rank_flops(args, cfg, tp, cp, rank) / flops_per_second
        tp_s = _seconds([c for c in collectives if c.dim == "tp"], dims, hw)
        cp_s = _seconds([c for c in collectives if c.dim == "cp"], dims, hw)
        fsdp = [c for c in collectives if c.dim.startswith("dp")]
        gathers = _seconds(fsdp, dims, hw, ops=("all_gather",))
        reduces = _seconds(fsdp, dims, hw, ops=("reduce_scatter", "all_reduce"))
        if pp > 1:
            dp_s = max(0.0, gathers - compute) + reduces
        else:
            last = max(rank_groups, key=lambda group: group[1])
            tail = fsdp_collectives([last], dims, shard, strategy, replace(cfg, grad_accum=1))
            dp_s = max(0.0, gathers + reduces - compute) + _seconds(tail, dims, hw, ops=("reduce_scatter", "all_reduce"))
        per_rank.append({"compute": compute, "tp": tp_s, "cp": cp_s, "dp": dp_s})
    busy = max(r["compute"] + r["tp"] + r["cp"] for r in per_rank)
    slowest = max(per_rank, key=lambda r: r["compute"] + r["tp"] + r["cp"])
    bubble_s = busy * (pp - 1) / (v * m)
    sends = [c for c in comms[0] + comms[-1] if c.dim == "pp"]
    pp_s = cfg.grad_accum * 2 * (pp - 1) * _seconds(sends[:1], dims, hw) if sends else 0.0
    dp_s = max(r["dp"] for r in per_rank)
    step = busy + bubble_s + pp_s + dp_s
    world = math.prod(dims.values())
    dp = world // (pp * cp * tp)
    tokens = cfg.batch * cfg.seq_len * m * cfg.grad_accum * dp
    model_flops = tokens * args.training_flops_per_token(cfg.seq_len)
    tflops = model_flops / step / world / 1e12
    executed = sum(rank_flops(args, cfg, tp, cp, rank) for rank in ranks) * micro_batches * (world // pp)
    return {
        "step_seconds": step,
        "compute_seconds": slowest["compute"],
        "tp_exposed_seconds": slowest["tp"],
        "cp_exposed_seconds": slowest["cp"],
        "bubble_seconds": bubble_s,
        "pp_exposed_seconds": pp_s,
        "dp_exposed_seconds": dp_s,
        "bubble": pipeline_bubble(pp, m, v),
        "tokens_per_step": tokens,
        "model_flops_per_token": args.training_flops_per_token(cfg.seq_len),
        "tflops_per_gpu": tflops,
        "mfu": tflops / hw.peak_tflops,
        "hfu": executed / step / world / 1e12 / hw.peak_tflops,
        "tokens_per_second_per_gpu": tokens / step / world,
    }


# ---------------------------------------------------------------- the plan


def plan_strategy(model, mesh: DeviceMesh, strategy_name: str, cfg: StepConfig, gpu_memory: Optional[float] = None,
                  layout: Optional[Layout] = None) -> dict:
    """The per-rank plan of one strategy for a model built by build_parallel_model on the
    (dp x cp, tp) mesh of one pipeline stage; `gpu_memory` (GiB) adds whether it fits and
    the largest micro-batch that does. With pp > 1 the memory terms and the collectives are
    those of the pp rank with the largest total (`pp_rank`)."""
    layout = layout or Layout()
    strategy = get_strategy(strategy_name)
    built = {name: mesh[name].size() for name in mesh.mesh_dim_names}
    dims = mesh_dims(built, layout)
    shard = built["dp_shard" if strategy.hybrid else "dp"]  # FSDP's group: dp (or dp_shard) x cp
    groups = group_shards(model, strategy)
    ranks = pipeline_ranks(model.args.n_layers, layout)
    rank_groups = [stage_groups(groups, rank) for rank in ranks]

    def memory(rank_index: int, batch_cfg: StepConfig) -> dict:
        return memory_bytes(model, rank_groups[rank_index], shard, strategy, batch_cfg, dims, ranks[rank_index])

    memories = [memory(i, cfg) for i in range(len(ranks))]
    peak = max(range(len(ranks)), key=lambda i: memories[i]["total_bytes"])
    labels = group_labels(mesh)
    world_label = labels[dist.group.WORLD.group_name] if layout.pp == 1 and layout.cp == 1 else "world"
    comms = [step_collectives(model, g, dims, shard, strategy, cfg, rank, layout, world_label)
             for rank, g in zip(ranks, rank_groups)]
    comm = summarize(comms[peak])
    fit = {}
    if gpu_memory is not None:
        gpu_bytes = round(gpu_memory * GIB)
        fit = {
            "gpu_memory_bytes": gpu_bytes,
            "fits": memories[peak]["total_bytes"] <= gpu_bytes,
            "max_micro_batch": largest_micro_batch(
                lambda batch: max(memory(i, replace(cfg, batch=batch))["total_bytes"] for i in range(len(ranks))),
                gpu_bytes,
            ),
        }
    result = {
        "strategy": strategy_name,
        "mesh": dims,
        "params_per_rank": sum(numel for _, numel, _ in rank_groups[peak]),
        **memories[peak],
        **fit,
        "comm": comm,
        "comm_wire_bytes": {dim: sum(op["wire_bytes"] for op in ops.values()) for dim, ops in comm.items()},
    }
    if layout.pp > 1:
        rank = ranks[peak]
        result.update(pp_rank=rank.rank, layers_on_rank=len(rank.layers), forwards_in_flight=len(rank.in_flight),
                      stage_layers=stage_layer_counts(model.args.n_layers, layout.pp * layout.virtual_stages,
                                                      layout.pipeline.fewer_end_layers))
    result["estimate"] = step_estimate(model.args, cfg, dims, layout, ranks, comms, rank_groups, shard, strategy)
    return result


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
    layout: Layout = Layout(),
) -> dict:
    """{strategy: plan} on a fake world of the ranks of one pipeline stage, world_size / pp
    (or the process group this process already has). Hybrid strategies use `dp_replicate`
    replica groups (default: `default_dp_replicate`). `gpu_memory` (GiB per GPU) adds
    fits / max_micro_batch. `layout` adds pp, cp, the pipeline schedule and the hardware of
    the step-time estimate."""
    dp = check_layout(args, world_size, tp, cfg, layout)  # one clear error before anything is built
    stage_world = world_size // layout.pp
    own_world = not dist.is_initialized()
    if own_world:
        init_fake_world(stage_world)
    try:
        if dist.get_world_size() != stage_world:
            raise ValueError(f"plan: the process group has {dist.get_world_size()} ranks, not {stage_world}")
        dp_replicate = dp_replicate or default_dp_replicate(dp)
        if layout.pp == 1 and layout.cp == 1:
            mesh_shape(world_size, tp, dp_replicate, hybrid=True)
        elif dp % dp_replicate:
            raise ValueError(f"--dp-replicate {dp_replicate} must divide the data-parallel size {dp} "
                             f"(= world {world_size} / (pp {layout.pp} x cp {layout.cp} x tp {tp}))")
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
            results[name] = plan_strategy(model, mesh, name, cfg, gpu_memory, layout)
        return results
    finally:
        if own_world:
            dist.destroy_process_group()


# choose_tp plans at most this many dp ranks and scales the model states (the only terms
# that FSDP shards over dp) to the real dp: planning costs time in proportion to dp, as
# FSDP chunks every parameter dp ways (8B on 16K ranks: minutes)
CHOOSE_TP_MAX_DP = 64


def choose_tp(args: ModelArgs, world_size: int, gpus_per_node: int, gpu_memory: float, cfg: StepConfig = StepConfig(),
              layout: Layout = Layout(), strategy: str = "full", dp_replicate: int = 1) -> tuple:
    """The default tp and the line saying why: the smallest tp (a divisor of the GPUs per
    node, so that its groups stay on NVLink) whose plan fits `gpu_memory` GiB per GPU. FSDP
    alone is the fastest where it fits (torchtitan trains 8B FSDP-only): tp's collectives
    carry every block's activations and sit on the critical path. None fits: the largest."""
    cut = layout.pp * layout.cp * (dp_replicate if get_strategy(strategy).hybrid else 1)
    needed, refused = [], ValueError(f"no --tp divides both {gpus_per_node} GPUs per node and {world_size} ranks")
    for tp in [t for t in range(1, gpus_per_node + 1) if gpus_per_node % t == 0 and world_size % (cut * t) == 0]:
        dp_shard = world_size // (cut * tp)
        planned = min(dp_shard, CHOOSE_TP_MAX_DP)
        try:
            result = plan(args, cut * tp * planned, tp, dp_replicate, replace(cfg, sequence_parallel=cfg.sequence_parallel
                          and tp > 1), (strategy,), layout=layout)[strategy]
        except ValueError as err:  # this tp does not split the heads or the sequence, or no tp would
            refused = err
            continue
        states = sum(result[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "master_bytes"))
        total = result["total_bytes"] - round(states * (1 - planned / dp_shard) * (1 + ALLOCATOR_SLACK))
        if total <= gpu_memory * GIB:
            smaller = "; " + ", ".join(f"tp {t} needs {_gib(n)}" for t, n in needed) if needed else ""
            return tp, (f"--tp {tp}: the smallest tp whose plan fits {gpu_memory:.1f} GiB per GPU ({_gib(total)} GiB"
                        f"{smaller}), FSDP sharding the rest; pass --tp to choose")
        needed.append((tp, total))
    if not needed:
        raise refused  # the largest tp's reason
    tp, total = needed[-1]
    return tp, (f"--tp {tp}: no tp up to {gpus_per_node} GPUs per node fits {gpu_memory:.1f} GiB per GPU (tp {tp} needs "
                f"{_gib(total)} GiB); add nodes, lower --micro-batch or --seq-len, or use --activation-checkpointing full")


# ---------------------------------------------------------------- command line


def _gib(n) -> str:
    return f"{n / GIB:.2f}"


DIM_ORDER = ["pp", "tp", "cp", "dp", "dp x cp", "dp_shard", "dp_shard x cp", "dp_replicate", "world"]


def format_table(results: dict, header: str) -> str:
    names = list(results)
    first = next(iter(results.values()))
    rows = [("", names)]

    def row(label, values):
        rows.append((label, [str(v) for v in values]))

    row("mesh", ["x".join(str(v) for v in r["mesh"].values()) for r in results.values()])
    if "pp_rank" in first:
        row("pp rank with the most memory", [r["pp_rank"] for r in results.values()])
        row("  its layers, forwards in flight", [f"{r['layers_on_rank']}, {r['forwards_in_flight']}" for r in results.values()])
    row("params / rank", [f"{r['params_per_rank']:,}" for r in results.values()])
    for key, label in MEMORY_ROWS:
        if key in first:
            row(label, [_gib(r[key]) for r in results.values()])
    if all("fits" in r for r in results.values()):
        row(f"fits in {_gib(first['gpu_memory_bytes'])} GiB",
            ["yes" if r["fits"] else "no" for r in results.values()])
        row("largest micro-batch that fits", [r["max_micro_batch"] for r in results.values()])
    dims = sorted({d for r in results.values() for d in r["comm"]}, key=DIM_ORDER.index)
    for dim in dims:
        ops = sorted({op for r in results.values() for op in r["comm"].get(dim, {})})
        for op in ops:
            cells = []
            for r in results.values():
                entry = r["comm"].get(dim, {}).get(op)
                cells.append("-" if entry is None else f"{entry['calls']} x, {_gib(entry['wire_bytes'])}")
            row(f"{dim} {op} (calls, GiB sent)", cells)
    for key, label in ESTIMATE_ROWS:
        if key.endswith("_seconds") and key != "step_seconds" and not any(r["estimate"][key] for r in results.values()):
            continue  # a dimension this mesh does not have
        row(label, [ESTIMATE_FORMAT.get(key, "{:.2f}").format(r["estimate"][key]) for r in results.values()])
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
    ("cp_kv_bytes", "cp all-gathered K/V (GiB)"),
    ("attention_workspace_bytes", "attention workspace (GiB)"),
    ("allocated_bytes", "= allocated peak (GiB)"),
    ("allocator_slack_bytes", "allocator slack (GiB)"),
    ("cuda_context_bytes", "CUDA context (GiB)"),
    ("nccl_bytes", "NCCL buffers (GiB)"),
    ("total_bytes", "= total (GiB)"),
]

ESTIMATE_ROWS = [
    ("compute_seconds", "est. compute (s)"),
    ("tp_exposed_seconds", "est. tp exposed (s)"),
    ("cp_exposed_seconds", "est. cp exposed (s)"),
    ("bubble_seconds", "est. pipeline bubble (s)"),
    ("pp_exposed_seconds", "est. pp sends exposed (s)"),
    ("dp_exposed_seconds", "est. dp exposed (s)"),
    ("step_seconds", "= est. step time (s)"),
    ("tflops_per_gpu", "est. model TFLOP/s per GPU"),
    ("mfu", "est. MFU"),
    ("hfu", "est. HFU (FLOPs executed)"),
]
ESTIMATE_FORMAT = {"compute_seconds": "{:.3f}", "tp_exposed_seconds": "{:.3f}", "cp_exposed_seconds": "{:.3f}",
                   "bubble_seconds": "{:.3f}", "pp_exposed_seconds": "{:.3f}", "dp_exposed_seconds": "{:.3f}",
                   "step_seconds": "{:.3f}", "tflops_per_gpu": "{:.0f}", "mfu": "{:.1%}", "hfu": "{:.1%}"}


def parse_args(argv=None) -> argparse.Namespace:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="python -m parallel.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=f"preset (required): {', '.join(PRESETS)}")
    p.add_argument("--nodes", type=int, default=1, help="machines (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=8,
        help="processes per machine; groups within one use NVLink in the estimate (default: %(default)s)")
    p.add_argument("--tp", type=int, default=None,
        help="tensor-parallel size (default: as train.py, the smallest that fits --gpu-memory, 79.1 if not given)")
    p.add_argument("--pp", type=int, default=1,
        help="pipeline-parallel stages, the outermost mesh dimension, as train.py --pp (default: %(default)s)")
    p.add_argument("--cp", type=int, default=1,
        help="context-parallel size, between dp and tp, as train.py --cp (default: %(default)s)")
    p.add_argument("--dp-replicate", type=int, default=None,
        help="HSDP replica groups (default: 2 when dp is even, else 1)")
    p.add_argument("--seq-len", type=int, default=d["seq_len"], help="tokens per sequence (default: %(default)s, as train.py)")
    p.add_argument("--micro-batch", "--batch", dest="batch", type=int, default=d["batch"],
        help="sequences per dp rank per micro-step, or per pipeline micro-batch (default: %(default)s, as train.py)")
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"],
        help="micro-steps per optimizer step; with --pp, runs of the whole schedule (default: %(default)s)")
    add_pipeline_arguments(p)
    p.add_argument("--strategy", default=d["strategy"],
        help=f"the one --json reports at top level: {', '.join(STRATEGIES)} (default: %(default)s)")
    p.add_argument("--dtype", "--mixed-precision", dest="mixed_precision", default=d["mixed_precision"],
        choices=["bf16", "fp32"], help="compute dtype (default: %(default)s, train.py's on CUDA)")
    p.add_argument("--activation-checkpointing", default=d["activation_checkpointing"], choices=["none", "full", "selective"],
        help="blocks recomputed in backward (default: %(default)s)")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=d["sequence_parallel"],
        help="split activations along the sequence between blocks when tp > 1 (default: on, as train.py)")
    p.add_argument("--document-masking", action=argparse.BooleanOptionalAction, default=d["document_masking"],
        help="attention within documents: flex attention's block mask on CUDA (default: on, as train.py)")
    p.add_argument("--gpu-memory", type=float, default=None,
        help="GiB per GPU (an 80 GB H100 reports 79.1): say whether the plan fits, and the largest "
             "micro-batch that does (default: not asked)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
        help="dense bf16 peak per GPU for the estimate and MFU (default: %(default)s, H100 SXM)")
    p.add_argument("--compute-efficiency", type=float, default=COMPUTE_EFFICIENCY,
        help="fraction of --peak-tflops the kernels are assumed to sustain (default: %(default)s, the best "
             "bf16 matmul measured on an H100 SXM)")
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
        if opts.peak_tflops <= 0 or not 0 < opts.compute_efficiency <= 1:
            raise ValueError(f"--peak-tflops {opts.peak_tflops} must be positive and --compute-efficiency "
                             f"{opts.compute_efficiency} in (0, 1]")
        world = opts.nodes * opts.gpus_per_node
        cfg = StepConfig(
            seq_len=opts.seq_len,
            batch=opts.batch,
            grad_accum=opts.grad_accum,
            sequence_parallel=opts.sequence_parallel,
            mixed_precision=opts.mixed_precision,
            activation_checkpointing=opts.activation_checkpointing,
            document_masking=opts.document_masking,
        )
        layout = Layout(
            pp=opts.pp,
            cp=opts.cp,
            pipeline=PipelineConfig.from_options(opts),
            hardware=Hardware(opts.peak_tflops, opts.compute_efficiency, opts.gpus_per_node),
        )
        args = PRESETS[opts.model]
        tp, tp_reason = opts.tp, None
        if tp is None:
            tp, tp_reason = choose_tp(args, world, opts.gpus_per_node, opts.gpu_memory or 79.1, cfg, layout, opts.strategy,
                                      opts.dp_replicate or 1)
        cfg = replace(cfg, sequence_parallel=cfg.sequence_parallel and tp > 1)
        dp = check_layout(args, world, tp, cfg, layout)
        dp_replicate = opts.dp_replicate or default_dp_replicate(dp)
        results = plan(args, world, tp, dp_replicate, cfg, gpu_memory=opts.gpu_memory, layout=layout)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokens = opts.batch * opts.seq_len * dp * opts.grad_accum * layout.microbatches
    chosen = results[opts.strategy]
    four_d = layout.pp > 1 or layout.cp > 1
    if opts.json:
        report = {
            "model": opts.model,
            "world_size": world,
            "tp": tp,
            "dp": dp,
            "dp_replicate": dp_replicate,
            **({"pp": layout.pp, "cp": layout.cp} if four_d else {}),
            **({"pp_microbatches": layout.microbatches, "pp_schedule": opts.pp_schedule,
                "virtual_stages": layout.virtual_stages} if layout.pp > 1 else {}),
            "tokens_per_step": tokens,
            **{k: v for k, v in vars(cfg).items()},
            **chosen,
            "strategies": results,
        }
        print(json.dumps(report, indent=1))
        return 0
    if four_d:
        pipeline = ""
        if layout.pp > 1:
            interleaved = f", {layout.virtual_stages} virtual stages" if layout.virtual_stages > 1 else ""
            pipeline = (f", {layout.microbatches} pipeline micro-batches ({opts.pp_schedule}{interleaved}, "
                        f"bubble {pipeline_bubble(layout.pp, layout.microbatches, layout.virtual_stages):.1%})")
        header = (
            f"{opts.model} on {opts.nodes} x {opts.gpus_per_node} = {world} ranks, mesh ("
            + ", ".join(name for name in chosen["mesh"]) + ") = (" + ", ".join(str(n) for n in chosen["mesh"].values())
            + f"); per rank, per step of {tokens:,} tokens (seq {opts.seq_len}, micro-batch {opts.batch}/dp rank"
            f"{pipeline}, grad_accum {opts.grad_accum}); "
        )
    else:
        header = (
            f"{opts.model} on {opts.nodes} x {opts.gpus_per_node} = {world} ranks, tp {tp}, dp {dp} "
            f"(hybrid: {dp_replicate} replicas x {dp // dp_replicate}); per rank, per step of {tokens:,} tokens "
            f"(seq {opts.seq_len}, micro-batch {opts.batch}/dp rank, grad_accum {opts.grad_accum}); "
        )
    header += (
        f"{cfg.mixed_precision}, sequence parallel {'on' if cfg.sequence_parallel else 'off'}, "
        f"activation checkpointing {cfg.activation_checkpointing}, "
        f"document masking {'on' if cfg.document_masking else 'off'}"
    )
    print(format_table(results, header))
    if tp_reason:
        print(tp_reason)
    print(assumptions_line(layout.hardware))
    if "fits" in chosen:
        print(fits_line(opts.strategy, chosen))
    return 0


def assumptions_line(hw: Hardware) -> str:
    return (
        f"estimate: kernels at {hw.compute_efficiency:.0%} of {hw.peak_tflops:g} TFLOP/s; NVLink "
        f"{hw.nvlink_bytes_per_s / 1e9:g} GB/s sent per GPU within a node of {hw.gpus_per_node}, "
        f"{hw.network_bytes_per_s / 1e9:g} GB/s between nodes; tp and cp collectives exposed, FSDP's overlapped "
        "(see parallel.plan.step_estimate)"
    )


def fits_line(strategy: str, result: dict) -> str:
    verdict = "fits" if result["fits"] else "does not fit"
    need, have = _gib(result["total_bytes"]), _gib(result["gpu_memory_bytes"])
    largest = result["max_micro_batch"]
    most = f"the largest micro-batch that fits is {largest}" if largest else "not even micro-batch 1 fits"
    return f"{strategy}: {verdict} ({need} of {have} GiB); {most}"


if __name__ == "__main__":
    sys.exit(main())
