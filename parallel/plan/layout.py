"""How the ranks divide a step: the 4-D `Layout` (pp, cp, the pipeline schedule, the
hardware), what each pp rank holds and runs (`PipelineRank`: its stages, layers and FSDP
groups, the forwards in flight at its peak), the pipeline bubble, the checks of the 4-D
shape, and the mesh's dimensions and how far their groups spread."""

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from llama.config import ModelArgs

from ..context import check_cp_divides, check_sequence_parallel_divides
from ..fsdp import fsdp_groups
from ..mesh import mesh_shape
from ..pipeline import PipelineConfig, check_pipeline, stage_layer_counts
from .config import Hardware, StepConfig
from .lora import nf4_code_bytes, nf4_scale_bytes, quantized_weights


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


def _own_params(modules, claimed: set) -> list:
    modules = modules if isinstance(modules, list) else [modules]
    params = []
    for module in modules:
        for param in module.parameters():
            if id(param) not in claimed:
                claimed.add(id(param))
                params.append(param)
    return params


class GroupShard(NamedTuple):
    """One FSDP group on this rank (rank 0: FSDP's padded shard sizes, which the
    collectives move). Without LoRA every parameter trains: trainable == numel."""

    name: str
    numel: int  # elements of this rank's shards of the group's parameters FSDP shards (not NF4)
    reshard: bool  # reshard_after_forward
    trainable: int = 0  # of them, those that train (all, or the adapters): gradients, AdamW state
    frozen_bytes: int = 0  # the frozen base's shards as stored (bf16 / fp32), NF4 ones excluded
    nf4_codes: int = 0  # bytes of the 4-bit codes of the weights stored as NF4
    nf4_scales: int = 0  # bytes of their double-quantised scales

    def gathered_bytes(self, shard: int, compute_bytes: int) -> int:
        """The group unsharded: what trains cast to the compute dtype, the frozen base in its
        storage dtype (the compute dtype too: build_parallel_model stores it so). NF4
        weights are not gathered: FSDP ignores them, each rank holds its whole tp shard."""
        return shard * (self.trainable * compute_bytes + self.frozen_bytes)


def group_shards(model, strategy, nf4: bool = False) -> list:
    """A GroupShard per FSDP group. `nf4`: the projections' frozen weights are planned as
    NF4, each rank's tp shard quantised on its own (not cut by dp), from the dtype they
    are stored in."""
    claimed: set = set()
    quantized = quantized_weights(model) if nf4 else set()
    groups = []
    for name, modules, reshard in fsdp_groups(model, strategy):
        numel = trainable = frozen = codes = scales = 0
        for param in _own_params(modules, claimed):
            local = param.to_local()
            if id(param) in quantized:  # FSDP ignores it: the rank's whole tp shard, as NF4
                codes += nf4_code_bytes(quantized[id(param)])
                scales += nf4_scale_bytes(quantized[id(param)], local.element_size())
                continue
            numel += local.numel()
            if param.requires_grad:
                trainable += local.numel()
            else:
                frozen += local.numel() * local.element_size()
        if numel:
            groups.append(GroupShard(name, numel, reshard, trainable, frozen, codes, scales))
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
