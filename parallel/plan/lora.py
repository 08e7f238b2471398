"""What LoRA and QLoRA change in a plan (llama/lora.py; docs/lora.md): the NF4 bytes of a
quantised frozen projection, which parameters are stored as NF4, the tensors a block's
adapters keep for backward, the adapter parameters per block (for the FLOPs), and the
replicated adapter factors whose tp shares `sum_adapter_gradients` sums once a step.

NF4 (QLoRA, Dettmers et al. 2023) as torchao's `to_nf4(w, block_size=64,
scaler_block_size=256)` lays it out (torchao/dtypes/nf4tensor.py, `NF4Tensor`), per tensor
of n weights quantised from dtype d (e bytes):
  quantized_data       uint8, two 4-bit codes a byte        n / 2
  quantized_scalers    int8, one absmax per block of 64     n / 64
  quantization_factor  d, one per 256 block scales          e n / (64 x 256)
  scaler_mean, nf4     d, the scales' mean and the 16 levels  17 e
So 0.5 + 1/64 + e/16384 bytes per weight (e = 4 from fp32, as the QLoRA paper keeps the
second-level constants; torchao keeps them in the weight's own dtype, e = 2 from bf16).
Only the seven projections' weights are quantised (TARGETS, whether or not they carry an
adapter); norms, the embedding and the output layer stay in the base's storage dtype.
Each rank quantises its own tp shard (llama/qlora.py) and FSDP leaves the NF4 weights
alone (ignored_params: neither dp-sharded nor gathered), so a rank holds 1/tp of each
projection in NF4 whatever dp is, and the constants count once per tp shard."""

from llama.lora import TARGETS

from ..layers import ColumnParallelLinear, RowParallelLinear, adapter_gradient_shares, tp_size

NF4_BLOCK = 64  # weights per int8 block scale
NF4_SCALER_BLOCK = 256  # block scales per second-level quantization factor
NF4_LEVELS = 16  # the NormalFloat lookup table


def nf4_code_bytes(numel: int) -> int:
    """The 4-bit codes of `numel` weights, two a byte."""
    return -(-numel // 2)


def nf4_scale_bytes(numel: int, dtype_bytes: int) -> int:
    """The double-quantised scales of `numel` weights quantised from a dtype of
    `dtype_bytes`: int8 block absmaxes, a factor per 256 of them, the mean and the levels."""
    blocks = -(-numel // NF4_BLOCK)
    return blocks + dtype_bytes * (-(-blocks // NF4_SCALER_BLOCK) + 1 + NF4_LEVELS)


def nf4_bytes(numel: int, dtype_bytes: int) -> int:
    return nf4_code_bytes(numel) + nf4_scale_bytes(numel, dtype_bytes)


def nf4_shard_numel(layer) -> int:
    """Weights of a projection that a rank quantises: its tp shard (rows of a column-parallel
    layer, its replicated_rows where kv heads are shared; columns of a row-parallel one),
    not cut by dp (llama/qlora.py)."""
    out_features, in_features = layer.weight.shape
    tp = tp_size(layer.tp_mesh)
    if isinstance(layer, RowParallelLinear):
        return out_features * (in_features // tp)
    if layer.replicated_rows is not None:
        return (layer.replicated_rows[1] - layer.replicated_rows[0]) * in_features
    return (out_features // tp) * in_features


def quantized_weights(model) -> dict:
    """id -> the rank's NF4 weights (nf4_shard_numel) of each parameter --base-dtype nf4
    stores as NF4: the frozen weights of the seven projections (wq, wk, wv, wo, w1, w2, w3)."""
    ids = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS and isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            if not module.weight.requires_grad:
                ids[id(module.weight)] = nf4_shard_numel(module)
    return ids


def nf4_dequantize_bytes(numel: int, compute_bytes: int) -> int:
    """The transient of one NF4 projection's use: torchao's linear_nf4 dequantises the
    gathered weight (numel) in forward and again in backward; its get_original_weight holds
    the two halves of the codes as int64 (8 numel), the dequantised halves and their scaled
    copies (2 compute_bytes numel) and the interleaved result (compute_bytes numel) at once."""
    return (8 + 3 * compute_bytes) * numel


def projection_inputs(model, tp: int) -> dict:
    """Target -> the width of its input on a rank: the column-parallel projections read the
    whole model dim; wo the rank's heads; w2 the rank's part of the MLP's hidden dim."""
    args = model.args
    heads = model.layers[0].attention.layout.n_local_heads * args.head_dim
    return {"wq": args.dim, "wk": args.dim, "wv": args.dim, "w1": args.dim, "w3": args.dim,
            "wo": heads, "w2": args.ffn_hidden_dim // tp}


def lora_block_activation_bytes(model, cfg, tp: int, cp: int = 1) -> int:
    """What a block's adapters keep for backward beyond the base block's tensors, for B
    sequences of s = S/cp tokens (b = bytes of the compute dtype, r = rank), per adapted
    projection: x A^T, B's input, b B s r (a row-parallel layer's is its partial sum); with
    dropout, also the dropped input that A's gradient reads and its bool mask, (b + 1) B s
    in (each adapter draws its own). A's other input, x, is the base block's."""
    if not cfg.lora_rank:
        return 0
    b, B, s = cfg.compute_bytes, cfg.batch, cfg.seq_len // cp
    widths = projection_inputs(model, tp)
    total = 0
    for target in cfg.lora_targets:
        total += b * B * s * cfg.lora_rank
        if cfg.lora_dropout:
            total += (b + 1) * B * s * widths[target]
    return total


def lora_block_params(args, cfg) -> int:
    """Adapter parameters of one block, r (in + out) per adapted projection, all tp ranks'."""
    if not cfg.lora_rank:
        return 0
    q, kv, h, f = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.dim, args.ffn_hidden_dim
    shapes = {"wq": (h, q), "wk": (h, kv), "wv": (h, kv), "wo": (q, h), "w1": (h, f), "w3": (h, f), "w2": (f, h)}
    return sum(cfg.lora_rank * sum(shapes[t]) for t in cfg.lora_targets)


def adapter_share_numel(model, layers) -> int:
    """Elements of this rank's shards of the replicated adapter factors of `layers` (block
    ids), whose gradients are per-tp-rank shares until sum_adapter_gradients all-reduces
    them, all in one collective, once per optimizer step."""
    return sum(param.to_local().numel() for i in layers for _, param in adapter_gradient_shares(model.layers[i]))


def frozen_bytes_per_param(model) -> int:
    """Bytes a frozen base weight is stored in (bf16 under bf16 mixed precision, as
    build_parallel_model stores it; fp32 in fp32 runs): what NF4 quantises from."""
    weight = model.layers[0].attention.wq.weight
    return weight.element_size() if not weight.requires_grad else 4

