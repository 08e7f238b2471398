"""The plan: the model built on the meta device on a fake world, read off its shards, per
strategy (`plan`, `plan_strategy`), and the default tp that train.py and the command line
take from it (`choose_tp`)."""

from dataclasses import replace
from typing import Optional

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from llama.config import ModelArgs

from ..fsdp import STRATEGIES, build_parallel_model, get_strategy
from ..mesh import build_mesh, mesh_shape
from ..pipeline import stage_layer_counts
from .comm import step_collectives
from .config import StepConfig
from .counter import group_labels, summarize
from .estimate import step_estimate
from .fake_world import init_fake_world
from .layout import Layout, check_layout, group_shards, mesh_dims, pipeline_ranks, stage_groups
from .memory import ALLOCATOR_SLACK, GIB, MODEL_STATE_KEYS, format_gib, largest_micro_batch, memory_bytes


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
    groups = group_shards(model, strategy, nf4=cfg.base_dtype == "nf4")
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
        "params_per_rank": sum(group.numel for group in rank_groups[peak]),
        **({"trainable_params_per_rank": sum(group.trainable for group in rank_groups[peak])} if cfg.lora_rank else {}),
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
                    lora=cfg.lora,
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
        states = sum(result.get(k, 0) for k in MODEL_STATE_KEYS)
        total = result["total_bytes"] - round(states * (1 - planned / dp_shard) * (1 + ALLOCATOR_SLACK))
        if total <= gpu_memory * GIB:
            smaller = "; " + ", ".join(f"tp {t} needs {format_gib(n)}" for t, n in needed) if needed else ""
            return tp, (f"--tp {tp}: the smallest tp whose plan fits {gpu_memory:.1f} GiB per GPU ({format_gib(total)} GiB"
                        f"{smaller}), FSDP sharding the rest; pass --tp to choose")
        needed.append((tp, total))
    if not needed:
        raise refused  # the largest tp's reason
    tp, total = needed[-1]
    return tp, (f"--tp {tp}: no tp up to {gpus_per_node} GPUs per node fits {gpu_memory:.1f} GiB per GPU (tp {tp} needs "
                f"{format_gib(total)} GiB); add nodes, lower --micro-batch or --seq-len, or use --activation-checkpointing full")
