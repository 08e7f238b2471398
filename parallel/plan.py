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
  activations   see `activation_bytes`
  comm          every collective of a training step, per mesh dimension: count, payload
                bytes (all-gather: gathered output; reduce-scatter: input; all-reduce:
                the tensor) and bytes each rank sends on a ring ((n-1)/n of the payload,
                twice that for an all-reduce)

`CommCounter` records the same quantities from a real run, so tests can hold the
planner to what actually happens.
"""

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode

from llama.config import PRESETS, ModelArgs

from .fsdp import STRATEGIES, build_parallel_model, checkpointed_blocks, fsdp_groups, get_strategy
from .mesh import build_mesh, dp_mesh, is_hybrid, mesh_shape

GIB = 2**30


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


@dataclass(frozen=True)
class StepConfig:
    seq_len: int = 8192
    batch: int = 1  # sequences per dp rank per micro-step
    grad_accum: int = 1
    sequence_parallel: bool = True
    mixed_precision: str = "bf16"
    activation_checkpointing: str = "full"

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
                                    + 4 B (heads/t) s    (log-sum-exp; flash/efficient kernels keep
                                                          no s x s scores; CPU's math kernel does)
                  MLP:                4 b B s f          (w1 out, silu, w3 out, product)
      checkpointed block:             b B s' h           (its input; one block is recomputed at a time)
      head:       norm + region input + b B s V/t logits, and the loss's fp32 gradient 4 B s V/t
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
    head = norm + region + (b + 4) * B * s * args.vocab_size // tp
    return blocks + head


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


def plan_strategy(model, mesh: DeviceMesh, strategy_name: str, cfg: StepConfig) -> dict:
    """The per-rank plan of one strategy for a model built by build_parallel_model."""
    strategy = get_strategy(strategy_name)
    dims = {name: mesh[name].size() for name in mesh.mesh_dim_names}
    groups = group_shards(model, strategy)
    params = sum(numel for _, numel, _ in groups)
    shard = dims["dp_shard" if strategy.hybrid else "dp"]
    collectives = step_collectives(model, mesh, strategy, cfg)
    comm = summarize(collectives)
    memory = {
        "param_bytes": params * 4,
        "grad_bytes": params * 4,
        "optimizer_bytes": params * 8,
        "master_bytes": 0,
        "gathered_param_bytes": gathered_param_bytes(groups, shard, strategy, cfg),
        "activation_bytes": activation_bytes(model, cfg, dims["tp"]),
    }
    return {
        "strategy": strategy_name,
        "mesh": dims,
        "params_per_rank": params,
        **memory,
        "total_bytes": sum(memory.values()),
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
) -> dict:
    """{strategy: plan} on a fake world of `world_size` ranks (or the process group this
    process already has). Hybrid strategies use `dp_replicate` replica groups (default:
    `default_dp_replicate`)."""
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
            results[name] = plan_strategy(model, mesh, name, cfg)
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
    for key, label in [
        ("param_bytes", "params fp32 (GiB)"),
        ("grad_bytes", "grads fp32 (GiB)"),
        ("optimizer_bytes", "AdamW m+v fp32 (GiB)"),
        ("master_bytes", "extra fp32 master (GiB)"),
        ("gathered_param_bytes", "gathered params peak (GiB)"),
        ("activation_bytes", "activations (GiB)"),
        ("total_bytes", "total (GiB)"),
    ]:
        row(label, [_gib(r[key]) for r in results.values()])
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallel.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help=f"preset (required): {', '.join(PRESETS)}")
    parser.add_argument("--nodes", type=int, default=1, help="machines (default: %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="processes per machine (default: %(default)s)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: --gpus-per-node)")
    parser.add_argument("--dp-replicate", type=int, default=None,
        help="HSDP replica groups (default: 2 when dp is even, else 1)")
    parser.add_argument("--seq-len", type=int, default=8192, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1,
        help="sequences per dp rank per micro-step (default: %(default)s)")
    parser.add_argument("--grad-accum", type=int, default=1,
        help="micro-steps per optimizer step (default: %(default)s)")
    parser.add_argument("--strategy", default="full",
        help=f"the one --json reports at top level: {', '.join(STRATEGIES)} (default: %(default)s)")
    parser.add_argument("--mixed-precision", default="bf16", choices=["bf16", "fp32"],
        help="compute dtype (default: %(default)s)")
    parser.add_argument("--activation-checkpointing", default="full", choices=["none", "full", "selective"],
        help="blocks recomputed in backward (default: %(default)s)")
    parser.add_argument("--no-sequence-parallel", action="store_true",
        help="plan without sequence parallelism (default: on when tp > 1)")
    parser.add_argument("--json", action="store_true",
        help="print the plan as JSON instead of a table (default: table)")
    opts = parser.parse_args(argv)
    try:
        if opts.model not in PRESETS:
            raise ValueError(f"unknown --model {opts.model!r}; choose one of {', '.join(PRESETS)}")
        get_strategy(opts.strategy)
        world = opts.nodes * opts.gpus_per_node
        tp = opts.tp or opts.gpus_per_node
        dp = mesh_shape(world, tp)["dp"]
        dp_replicate = opts.dp_replicate or default_dp_replicate(dp)
        cfg = StepConfig(
            seq_len=opts.seq_len,
            batch=opts.batch,
            grad_accum=opts.grad_accum,
            sequence_parallel=not opts.no_sequence_parallel and tp > 1,
            mixed_precision=opts.mixed_precision,
            activation_checkpointing=opts.activation_checkpointing,
        )
        args = PRESETS[opts.model]
        results = plan(args, world, tp, dp_replicate, cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokens = opts.batch * opts.seq_len * dp * opts.grad_accum
    if opts.json:
        report = {
            "model": opts.model,
            "world_size": world,
            "tp": tp,
            "dp": dp,
            "dp_replicate": dp_replicate,
            "tokens_per_step": tokens,
            **{k: v for k, v in vars(cfg).items()},
            **results[opts.strategy],
            "strategies": results,
        }
        print(json.dumps(report, indent=1))
    else:
        header = (
            f"{opts.model} on {opts.nodes} x {opts.gpus_per_node} = {world} ranks, tp {tp}, dp {dp} "
            f"(hybrid: {dp_replicate} replicas x {dp // dp_replicate}); per rank, per step of {tokens:,} tokens "
            f"(seq {opts.seq_len}, batch {opts.batch}/dp rank, grad_accum {opts.grad_accum}); "
            f"{cfg.mixed_precision}, sequence parallel {'on' if cfg.sequence_parallel else 'off'}, "
            f"activation checkpointing {cfg.activation_checkpointing}"
        )
        print(format_table(results, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
