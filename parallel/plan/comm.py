"""The collectives of one optimizer step in closed form, per mesh dimension: FSDP's
gathers and reductions over dp (x cp), the tensor-parallel layers' over tp, context
parallelism's K/V gathers over cp, the pipeline's sends over pp, and the gradient norm's
all-reduce. Each is a `Collective`, as `CommCounter` records them from a real run."""

import math
from typing import Optional

from ..fsdp import checkpointed_blocks
from .config import StepConfig
from .counter import Collective
from .layout import Layout, PipelineRank, whole_model
from .lora import adapter_share_numel


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
    is dp (dp_shard for HSDP) times cp: context-parallel ranks hold different tokens.
    With LoRA a group gathers its frozen base in its storage dtype (no NF4: FSDP
    ignores it) and reduces
    only its adapters' gradients; a group without adapters reduces nothing."""
    label = "dp_shard" if strategy.hybrid else "dp"
    if dims.get("cp", 1) > 1:
        label += " x cp"
    out = []
    for group in groups:
        if shard > 1:
            gathered = Collective(label, "all_gather", group.gathered_bytes(shard, cfg.compute_bytes), shard)
            if pipelined_microbatches:
                out.append(gathered)
            else:
                out += [gathered] * (2 if group.reshard else 1)
            if group.trainable:
                out.append(Collective(label, "reduce_scatter", shard * group.trainable * 4, shard))
        if strategy.hybrid and group.trainable:
            out.append(Collective("dp_replicate", "all_reduce", group.trainable * 4, dims["dp_replicate"]))
    return out * cfg.grad_accum


def tp_collectives(model, cfg: StepConfig, tp: int, rank: Optional[PipelineRank] = None, cp: int = 1,
                   microbatches: int = 1) -> list:
    """Per optimizer step, the tensor-parallel layers' collectives. Per micro-batch
    (Megatron's minimum): per block 2 in forward, 2 in backward, each an all-reduce of the
    (batch, seq/cp, dim) activation, or a reduce-scatter + all-gather pair with sequence
    parallelism; in a recomputed block's forward again only the region inputs' (the two
    all-gathers with sequence parallelism, nothing without); the embedding's on the first
    stage; the head's and the loss's small all-gather on the last. Per micro-step
    without a pipeline, once per step with one: the all-reduce of each gradient the tp ranks
    computed in part (kv projections shared when tp > n_kv_heads), which FSDP does when it
    reduces. Per micro-batch, under sequence parallelism: each norm weight's fp32 all-reduce
    in backward (parallel/layers.py sequence_parallel_weight). With LoRA the frozen norms and
    kv projections have no gradient to sum; instead, once per optimizer step, one fp32
    all-reduce of the tp shares of the replicated adapter factors' gradients
    (parallel/layers.py sum_adapter_gradients)."""
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
    # A recomputed block takes its reductions' outputs from the first forward
    # (parallel/fsdp.py keep_reductions) and sends its region inputs' gathers again.
    recompute = enter("fwd") + enter("fwd")
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
        if not param.requires_grad:
            continue
        shared_kv = name.endswith(("wk.weight", "wv.weight")) and not model.layers[0].attention.layout.kv_sharded
        if sp and name.endswith("norm.weight") and _on_rank(name, rank):
            norms.append(Collective("tp", "all_reduce", param.numel() * 4, tp))  # in fp32, in each backward
        elif shared_kv and _on_rank(name, rank):
            partial.append(Collective("tp", "all_reduce", param.numel() * cfg.compute_bytes, tp))
    shares = adapter_share_numel(model, rank.layers)
    adapters = [Collective("tp", "all_reduce", 4 * shares, tp)] if shares else []
    return ((out + norms) * microbatches + partial) * cfg.grad_accum + adapters


def cp_collectives(model, cfg: StepConfig, cp: int, rank: PipelineRank, microbatches: int) -> list:
    """Per optimizer step, context parallelism as in Llama 3: each block all-gathers its
    keys and values over cp in forward, both in one collective, again when recomputed,
    and reduce-scatters their gradients in backward, again in one; each payload is the
    whole sequence's K and V for this rank's kv heads. (The document ids' one small
    gather per micro-batch is left out.)"""
    if cp == 1:
        return []
    args = model.args
    layout = model.layers[0].attention.layout
    payload = 2 * cfg.compute_bytes * cfg.batch * cfg.seq_len * layout.n_local_kv_heads * args.head_dim  # K and V
    gather = [Collective("cp", "all_gather", payload, cp)]
    scatter = [Collective("cp", "reduce_scatter", payload, cp)]
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
