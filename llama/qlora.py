"""QLoRA's frozen base (Dettmers et al. 2023): `--base-dtype nf4` stores the seven
projections' weights (wq, wk, wv, wo, w1, w2, w3) as 4-bit NormalFloat with double
quantisation, block 64 with the block scales quantised again in blocks of 256, as torchao's
`NF4Tensor` lays it out. Norms, the embedding and the output layer stay bf16/fp32.

Each rank quantises its own tensor-parallel shard, after that shard is read or drawn, never
the whole tensor: a column-parallel layer's rows (its `replicated_rows` only, where kv heads
are shared), a row-parallel layer's columns. The NF4 weight is a plain frozen parameter (no
DTensor) that FSDP leaves alone (`fully_shard(ignored_params=...)`, see nf4_ignored_params),
so a rank holds 1/tp of each projection in NF4, not 1/(dp x tp). Why not through FSDP:
- tried: letting FSDP2 shard the weights over dp as well (no ignored_params) makes each
  rank's piece a (dp, tp) shard; at dp 2 x tp 2 on the test model wk's is 32 x 256 = 8192
  weights, under one 64 x 256 block unit, so quantising it fails check_nf4_shapes, and
  the block layout would depend on dp.
- not tried (no time in this change): NF4Tensor inside a DTensor (DTensor.from_local of an
  NF4Tensor), and torchao's FSDP2 all-gather hooks with our 2-D (dp, tp) parameters;
  torchao's hooks are written for torchtune's 1-D FSDP over plain NF4Tensors.

Which values a mesh sees: NF4 keeps one mean of the block scales per quantised tensor
(`scaler_mean`, subtracted before the second quantisation), so a shard quantises to other
values than the same elements of the whole tensor, whichever dim tp cuts. Runs with the
same tp (any dp) hold the same NF4 base; runs with different tp hold different (equally
good) ones. `dequantized_base` gives the plain weights a tp size's shards dequantise to."""

import torch
import torch.nn as nn

from parallel.layers import ColumnParallelLinear, RowParallelLinear, local_tensor

from .lora import TARGETS

BASE_DTYPES = ("nf4",)
NF4_BLOCK = 64  # weights per block scale
NF4_SCALER_BLOCK = 256  # block scales per second-level factor (double quantisation)
INSTALL = "pip install -e '.[qlora]'"


def require_torchao():
    """torchao's to_nf4, or one error saying how to install it."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError as e:
        raise RuntimeError(f"--base-dtype nf4 (QLoRA) needs torchao, which is not installed: {INSTALL}") from e
    return to_nf4


def projections(model: nn.Module) -> dict:
    """Name -> layer of the seven projections of every block, adapted or not."""
    return {name: layer for name, layer in model.named_modules()
            if name.rsplit(".", 1)[-1] in TARGETS and isinstance(layer, (ColumnParallelLinear, RowParallelLinear))}


def _rank_weight(layer) -> torch.Tensor:
    """The part of the layer's weight this rank multiplies with: its tp shard, or its rows
    of a weight replicated over tp (kv heads shared by several ranks)."""
    local = local_tensor(layer.weight)
    if isinstance(layer, ColumnParallelLinear) and layer.replicated_rows is not None:
        start, stop = layer.replicated_rows
        local = local[start:stop]
    return local


def check_nf4_shapes(model: nn.Module) -> None:
    """Every projection's rank shard must hold whole blocks of 64 x 256 weights (torchao
    does not pad): one error naming the tensor, its shard and the fix."""
    unit = NF4_BLOCK * NF4_SCALER_BLOCK
    for name, layer in projections(model).items():
        shape = tuple(_rank_weight(layer).shape)
        numel = shape[0] * shape[1]
        if numel % unit:
            tp = 1 if layer.tp_mesh is None else layer.tp_mesh.size()
            raise ValueError(
                f"--base-dtype nf4: {name}.weight's shard on a rank at tp {tp} has shape {shape} ({numel} weights), "
                f"not a multiple of {unit} (NF4 blocks of {NF4_BLOCK} weights, their scales in blocks of "
                f"{NF4_SCALER_BLOCK}); choose a --tp that leaves whole blocks, or drop --base-dtype nf4"
            )


def nf4_ignored_params(model: nn.Module) -> set:
    """The weights that will be NF4: FSDP must not shard them (fully_shard's ignored_params)."""
    return {layer.weight for layer in projections(model).values()}


@torch.no_grad()
def quantize_base_nf4_(model: nn.Module) -> int:
    """Replace each projection's weight by its rank shard in NF4 (double quantised), a plain
    frozen parameter; after the base is read or drawn. Returns how many were quantised."""
    to_nf4 = require_torchao()
    check_nf4_shapes(model)
    count = 0
    for layer in projections(model).values():
        shard = _rank_weight(layer).detach().contiguous()
        layer.weight = nn.Parameter(to_nf4(shard, NF4_BLOCK, NF4_SCALER_BLOCK), requires_grad=False)
        layer.nf4 = True
        count += 1
    return count


def nf4_weights(model: nn.Module) -> dict:
    """Name -> NF4 weight of every quantised projection."""
    return {f"{name}.weight": layer.weight for name, layer in projections(model).items() if layer.nf4}


def nf4_storage_bytes(weight) -> int:
    """Bytes an NF4Tensor holds: codes, int8 block scales, second-level factors, the scales'
    mean and the 16 levels."""
    parts = (weight.quantized_data, weight.quantized_scalers, weight.quantization_factor, weight.scaler_mean, weight.nf4)
    return sum(t.numel() * t.element_size() for t in parts)


@torch.no_grad()
def dequantized_base(state: dict, shards: dict) -> dict:
    """The plain weights a run's NF4 base dequantises to, from whole weights (`state`, name ->
    tensor): each projection cut into `shards[name] = (dim, parts)` as its tp shards are,
    each part quantised alone, dequantised and put back together. Other tensors unchanged."""
    to_nf4 = require_torchao()
    out = dict(state)
    for name, (dim, parts) in shards.items():
        pieces = [to_nf4(p.contiguous(), NF4_BLOCK, NF4_SCALER_BLOCK).get_original_weight()
                  for p in state[name].chunk(parts, dim)]
        out[name] = torch.cat(pieces, dim)
    return out
