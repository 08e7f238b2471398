"""The step-time estimate: the FLOPs each rank executes, its collectives' time at the link
bandwidths of `Hardware`, the pipeline bubble, and the model FLOPs per GPU (MFU) that
follow."""

import math
from dataclasses import replace

from llama.config import ModelArgs

from ..fsdp import checkpointed_blocks
from .comm import fsdp_collectives
from .config import Hardware, StepConfig
from .layout import Layout, PipelineRank, group_span, pipeline_bubble
from .lora import lora_block_params


def block_params(args: ModelArgs) -> int:
    """Weights of one TransformerBlock: attention, MLP, two norms."""
    kv = args.n_kv_heads * args.head_dim
    return args.dim * (2 * args.dim + 2 * kv) + 3 * args.dim * args.ffn_hidden_dim + 2 * args.dim


def rank_flops(args: ModelArgs, cfg: StepConfig, tp: int, cp: int, rank: PipelineRank) -> float:
    """FLOPs one rank executes per micro-batch: for each of its blocks, per token,
    2 per weight forward and 4 backward, and causal attention's 2 x 2 x heads x head_dim x
    S/2 forward (QK^T and PV; a query meets S/2 keys on average; cp's load-balanced chunks
    keep that true per cp rank), twice that backward; a recomputed block's forward once more;
    the LM head's 6 x vocab x dim per token on the last stage; all split over tp.
    With LoRA the frozen base computes only its input gradients in backward: 2 per weight,
    2/3 of a full backward's matmuls; the adapters (r (in + out) per projection, the two
    small matmuls) 2 forward and 4 backward."""
    tokens = cfg.batch * cfg.seq_len // cp
    attention_forward = 2 * args.n_heads * args.head_dim * cfg.seq_len  # 4 x S/2
    weight_backward = 2 if cfg.lora_rank else 4  # input gradients (+ weight gradients)
    adapters = lora_block_params(args, cfg)
    block_forward = 2 * (block_params(args) + adapters) + attention_forward
    block_backward = weight_backward * block_params(args) + 4 * adapters + 2 * attention_forward
    checkpointed = set(checkpointed_blocks(args.n_layers, cfg.activation_checkpointing))
    per_token = sum(block_forward + block_backward + (block_forward if layer in checkpointed else 0)
                    for layer in rank.layers)
    if rank.last:
        per_token += (2 + weight_backward) * args.vocab_size * args.dim
    return tokens * per_token / tp


def model_flops_per_token(args: ModelArgs, cfg: StepConfig) -> int:
    """The model FLOPs of MFU: ModelArgs.training_flops_per_token (6 per weight, the full
    S x S attention); with LoRA the frozen weights' 2 per weight of weight gradients left
    out and the adapters' 6 per parameter added."""
    full = args.training_flops_per_token(cfg.seq_len)
    if not cfg.lora_rank:
        return full
    dense = args.num_params(include_embedding=False) + (args.vocab_size * args.dim if args.tie_word_embeddings else 0)
    return full - 2 * dense + 6 * args.n_layers * lora_block_params(args, cfg)


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
    `model_flops_per_token` (the full S x S attention), HFU the FLOPs the
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
            last = max(rank_groups, key=lambda group: group.trainable)
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
    model_flops = tokens * model_flops_per_token(args, cfg)
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
        "model_flops_per_token": model_flops_per_token(args, cfg),
        "tflops_per_gpu": tflops,
        "mfu": tflops / hw.peak_tflops,
        "hfu": executed / step / world / 1e12 / hw.peak_tflops,
        "tokens_per_second_per_gpu": tokens / step / world,
    }
