"""Per-rank memory of a training step, in closed form from the shard shapes: model states,
FSDP's gathered parameters and gradient buffers, activations (with checkpointing), cp's
gathered keys and values, attention's workspace, and what the caching allocator does not
count (its slack, the CUDA context, NCCL's buffers); and the largest micro-batch that fits."""

import math
from dataclasses import replace
from typing import Callable, Optional

from llama.config import ModelArgs

from ..fsdp import checkpointed_blocks
from ..losses import CROSS_ENTROPY_CHUNK_BYTES
from .config import StepConfig
from .layout import PipelineRank, whole_model
from .lora import lora_block_activation_bytes, nf4_dequantize_bytes, quantized_weights

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

# The model states, which FSDP shards over dp: without LoRA the first four; with LoRA the
# frozen base (NF4 codes or bf16/fp32 weights), NF4's scales, and the adapters' states
MODEL_STATE_KEYS = ("param_bytes", "grad_bytes", "optimizer_bytes", "master_bytes", "base_param_bytes",
                    "nf4_scale_bytes", "adapter_param_bytes", "adapter_grad_bytes", "adapter_optimizer_bytes")


def format_gib(n) -> str:
    return f"{n / GIB:.2f}"


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
                                              the whole sequence, which attention saves)
      LoRA:               x A^T per adapted projection, and with dropout its dropped input
                          (parallel.plan.lora.lora_block_activation_bytes). The frozen base
                          keeps the base block's tensors: an upper bound, as a projection
                          without an adapter and a frozen weight needs no input saved for a
                          weight gradient, but the adapted ones read the same inputs."""
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
    block = 2 * norm + 2 * region + attention + 4 * b * B * s * f + lora_block_activation_bytes(model, cfg, tp, cp)
    return block, 2 * b * B * full * kv


def activation_bytes(model, cfg: StepConfig, tp: int, cp: int = 1, rank: Optional[PipelineRank] = None) -> tuple:
    """(activations, keys and values) a rank keeps for backward at its peak: for each
    forward in flight (one without a pipeline; see forwards_in_flight), its stage's blocks,
    a checkpointed block keeping its input b B s' h and, when tp > 1, the outputs of its two
    tp reductions (parallel/fsdp.py keep_reductions), each the input's size: the attention's
    and the MLP's all-reduce, or with sequence parallelism their reduce-scatter; one
    checkpointed block rebuilt at a time; and on the last stage the head: norm + region
    input + `loss_bytes`."""
    args = model.args
    rank = rank or whole_model(args.n_layers)
    block, kv = block_activation_bytes(model, cfg, tp, cp)
    b, B, s, h = cfg.compute_bytes, cfg.batch, cfg.seq_len // cp, args.dim
    s_local = s // tp if cfg.sequence_parallel and tp > 1 else s
    checkpointed = set(checkpointed_blocks(args.n_layers, cfg.activation_checkpointing))
    kept = (1 + (2 if tp > 1 else 0)) * b * B * s_local * h  # a checkpointed block's input and reductions
    activations = keys_values = 0
    for stage in rank.in_flight:
        for layer in rank.layers_of(stage):
            if layer in checkpointed:
                activations += kept
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
    gathered from its first backward to the end of the step (see fsdp_collectives). A
    group gathers in the compute dtype, a LoRA run's frozen base in its storage dtype, and
    no NF4 weights (GroupShard.gathered_bytes)."""
    sizes = [(group.gathered_bytes(shard, cfg.compute_bytes), group.reshard) for group in groups]
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
    fresh compute-dtype gradient of the group computing.

    Only what trains has gradients: with LoRA, the adapters (FSDP2 reduces only the
    parameters that got a gradient)."""
    unsharded = {group.name: group.trainable * shard for group in groups}
    if pipelined:
        largest = max(unsharded.values())
        fresh = cfg.compute_bytes * largest if cfg.compute_bytes != 4 else 0
        return 4 * sum(unsharded.values()) + fresh, 4 * largest
    root = unsharded.pop("root", 0)
    largest = max(unsharded.values(), default=root)
    return cfg.compute_bytes * (root + largest), 4 * max(largest, root)


def model_state_bytes(groups, cfg: StepConfig) -> dict:
    """This rank's shards of the model states. Without LoRA: fp32 params (the master
    weights under bf16 mixed precision; FSDP2 keeps no second copy), fp32 grads, AdamW m and
    v. With LoRA: the frozen base as stored (bf16 under bf16 mixed precision, fp32 in fp32
    runs, NF4 codes with --base-dtype nf4, the norms, embedding and output layer then still
    bf16/fp32), NF4's scales, and the adapters: fp32 params, grads and AdamW m and v."""
    trainable = sum(group.trainable for group in groups)
    if not cfg.lora_rank:
        return {"param_bytes": 4 * trainable, "grad_bytes": 4 * trainable, "optimizer_bytes": 8 * trainable,
                "master_bytes": 0}
    states = {"base_param_bytes": sum(group.frozen_bytes + group.nf4_codes for group in groups)}
    if cfg.base_dtype == "nf4":
        states["nf4_scale_bytes"] = sum(group.nf4_scales for group in groups)
    states.update(adapter_param_bytes=4 * trainable, adapter_grad_bytes=4 * trainable,
                  adapter_optimizer_bytes=8 * trainable, master_bytes=0)
    return states


def nf4_transient_bytes(model, shard: int, cfg: StepConfig) -> int:
    """With --base-dtype nf4: the largest projection's tp shard dequantised for its matmul
    (torchao's linear_nf4; parallel.plan.lora.nf4_dequantize_bytes); FSDP does not gather
    NF4 weights, so dp does not enter."""
    if cfg.base_dtype != "nf4":
        return 0
    return nf4_dequantize_bytes(max(quantized_weights(model).values()), cfg.compute_bytes)


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
    unsharded_grads, reduce_scatter = fsdp_gradient_buffers(groups, shard, cfg, pipelined)
    activations, keys_values = activation_bytes(model, cfg, dims["tp"], cp, rank)
    allocated = {
        **model_state_bytes(groups, cfg),
        "gathered_param_bytes": gathered_param_bytes(groups, shard, strategy, cfg, pipelined),
        "unsharded_grad_bytes": unsharded_grads,
        "reduce_scatter_bytes": reduce_scatter,
        "activation_bytes": activations if cp > 1 else activations + keys_values,
    }
    if cp > 1:
        allocated["cp_kv_bytes"] = keys_values
    allocated["attention_workspace_bytes"] = attention_workspace_bytes(model, cfg, cp)
    if cfg.base_dtype == "nf4":
        allocated["nf4_dequantized_bytes"] = nf4_transient_bytes(model, shard, cfg)
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
