"""Tensor-parallel layers: the one place that knows placements and calls collectives.

Each layer owns DTensor parameters on a 1-D tp mesh (or plain parameters without a
mesh) and does its math on local shards. Collectives happen only where Megatron puts
them: `RegionInput` enters the tensor-parallel region (identity forward, all-reduce
backward; all-gather / reduce-scatter along the sequence with sequence parallelism),
`RowParallelLinear` and `VocabParallelEmbedding` leave it (all-reduce forward, or
reduce-scatter along the sequence). With sequence parallelism a norm's weight gradient is
summed over tp in backward (`sequence_parallel_weight`). Everything else is local.
"""

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from parallel.compat import all_gather_along, all_reduce_sum, reduce_scatter_along
from parallel.lora_layers import LoRA, LoRAOperands, linears_with_lora

SEQ_DIM = 1  # activations are (batch, seq, features)


def tp_size(mesh: Optional[DeviceMesh]) -> int:
    return 1 if mesh is None else mesh.size()


def tp_rank(mesh: Optional[DeviceMesh]) -> int:
    return 0 if mesh is None else mesh.get_local_rank()


# ---------------------------------------------------------------- collectives


# The collectives themselves are parallel/compat.py's: torch's names for them differ
# between the versions we admit.


class _CopyToRegion(torch.autograd.Function):
    """Identity forward; backward sums the tp ranks' gradients. With `sum_dtype` (a norm
    weight's shares, in fp32) the sum runs in that dtype and rounds once at the end, where
    a bf16 all-reduce would round at every step of its ring."""

    @staticmethod
    def forward(ctx, x, mesh, sum_dtype=None):
        ctx.mesh, ctx.sum_dtype = mesh, sum_dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.sum_dtype is None:
            return all_reduce_sum(grad, ctx.mesh), None, None
        return all_reduce_sum(grad.to(ctx.sum_dtype), ctx.mesh).to(grad.dtype), None, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh):
        return all_reduce_sum(x, mesh)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return all_gather_along(x, SEQ_DIM, mesh)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_along(grad, SEQ_DIM, ctx.mesh), None


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return reduce_scatter_along(x, SEQ_DIM, mesh)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, SEQ_DIM, ctx.mesh), None


def _leave_region(x: torch.Tensor, mesh: Optional[DeviceMesh], sequence_parallel: bool) -> torch.Tensor:
    """Sum the tp ranks' partial results: all-reduce, or reduce-scatter along the sequence."""
    if tp_size(mesh) == 1:
        return x
    if sequence_parallel:
        return _ScatterSequence.apply(x, mesh)
    return _ReduceFromRegion.apply(x, mesh)


class RegionInput(nn.Module):
    """Hands a replicated (or, with sequence parallelism, sequence-sharded) activation to
    column-parallel layers. Put one in front of all the layers that read the same input,
    so that their input gradients are summed by one collective, not one each."""

    def __init__(self, tp_mesh: Optional[DeviceMesh] = None, sequence_parallel: bool = False):
        super().__init__()
        self.tp_mesh = tp_mesh
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tp_size(self.tp_mesh) == 1:
            return x
        if self.sequence_parallel:
            return _GatherSequence.apply(x, self.tp_mesh)
        return _CopyToRegion.apply(x, self.tp_mesh)


# ---------------------------------------------------------------- parameters


def _shard_shape_and_offset(global_shape, mesh: DeviceMesh, placements) -> tuple:
    # torch's helper makes small tensors; keep them off the meta device when called
    # inside a `with torch.device("meta")` block
    with torch.device("cpu"):
        return compute_local_shape_and_global_offset(global_shape, mesh, placements)


def sharded_parameter(global_shape, mesh: Optional[DeviceMesh], placement, dtype=None) -> nn.Parameter:
    """An uninitialised parameter holding only this rank's shard; on the meta device
    (a `with torch.device("meta")` block) nothing is allocated."""
    if mesh is None:
        return nn.Parameter(torch.empty(global_shape, dtype=dtype))
    local_shape, _ = _shard_shape_and_offset(global_shape, mesh, [placement])
    local = torch.empty(local_shape, dtype=dtype)
    return nn.Parameter(DTensor.from_local(local, mesh, [placement], run_check=False))


def local_slices(param: torch.Tensor) -> tuple:
    """The index of this rank's shard in the global tensor, e.g. for reading it from a file."""
    if not isinstance(param, DTensor):
        return tuple(slice(0, n) for n in param.shape)
    shape, offset = _shard_shape_and_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def local_tensor(param: torch.Tensor, partial_grad: bool = False) -> torch.Tensor:
    """The local shard of a parameter, for math. `partial_grad`: this rank's gradient is
    only its share of the total (it saw part of the sequence or part of the heads)."""
    if not isinstance(param, DTensor):
        return param
    grad_placements = [Partial()] * param.device_mesh.ndim if partial_grad else None
    return param.to_local(grad_placements=grad_placements)


def sequence_parallel_weight(param: torch.Tensor, tp_mesh: Optional[DeviceMesh]) -> torch.Tensor:
    """The local copy of a replicated weight (a norm's) that each tp rank applies to its part
    of the sequence under sequence parallelism. Each rank's gradient is a share of the
    total; backward sums the shares over tp in fp32, whatever the compute dtype, so the
    parameter's gradient arrives whole (to FSDP, or to the optimizer)."""
    weight = local_tensor(param)
    if tp_size(tp_mesh) == 1:
        return weight
    return _CopyToRegion.apply(weight, tp_mesh, torch.float32)


def reduce_partial_gradients(module: nn.Module) -> int:
    """Sum the gradients that tp ranks computed in part (kv projections shared by several
    ranks), one all-reduce per mesh for all of them. Call between backward and the
    optimizer step. Returns how many gradients it reduced. (Norm weights under sequence
    parallelism are summed in backward: `sequence_parallel_weight`.)"""
    by_mesh: dict = {}
    for param in module.parameters():
        grad = param.grad
        if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
            by_mesh.setdefault(grad.device_mesh, []).append(param)
    for mesh, params in by_mesh.items():
        locals_ = [p.grad.to_local() for p in params]
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in locals_]), mesh) if mesh.size() > 1 else None
        offset = 0
        for param, g in zip(params, locals_):
            summed = g if flat is None else flat[offset : offset + g.numel()].view_as(g)
            offset += g.numel()
            param.grad = DTensor.from_local(summed, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return sum(len(p) for p in by_mesh.values())


def fill_normal_(param: torch.Tensor, std: float, seed: int, name: str, block_rows: int = 256) -> None:
    """Fill this rank's shard with N(0, std^2) values equal to those a single device would
    draw for the whole tensor, so that a model's init does not depend on the mesh."""
    _fill_by_row_blocks_(param, seed, name, block_rows, lambda shape, gen: torch.randn(shape, generator=gen).mul_(std))


def fill_uniform_(param: torch.Tensor, bound: float, seed: int, name: str, block_rows: int = 256) -> None:
    """Fill this rank's shard with U(-bound, bound) values, mesh-independent as fill_normal_."""
    _fill_by_row_blocks_(
        param, seed, name, block_rows, lambda shape, gen: torch.rand(shape, generator=gen).mul_(2 * bound).sub_(bound)
    )


def _fill_by_row_blocks_(param: torch.Tensor, seed: int, name: str, block_rows: int, draw) -> None:
    """The tensor is drawn in blocks of rows, each from its own generator seeded by (seed,
    name, block); a rank draws only the row blocks it holds and keeps its part of them."""
    local = local_tensor(param)
    offset = tuple(s.start for s in local_slices(param))
    if local.numel() == 0:
        return
    global_shape = tuple(param.shape)
    other_dims = tuple(slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:]))
    first, last = offset[0], offset[0] + local.shape[0]
    base_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)
    with torch.no_grad():
        for block in range(first // block_rows, math.ceil(last / block_rows)):
            b0 = block * block_rows
            b1 = min(b0 + block_rows, global_shape[0])
            gen = torch.Generator().manual_seed(base_seed + block)
            values = draw((b1 - b0, *global_shape[1:]), gen)
            lo, hi = max(b0, first), min(b1, last)
            local[lo - first : hi - first].copy_(values[(slice(lo - b0, hi - b0), *other_dims)])


# ---------------------------------------------------------------- layers


@dataclass(frozen=True)
class HeadLayout:
    """Which attention heads live on one tp rank. Query heads are split evenly; each rank
    also holds the kv heads its query heads read. When tp > n_kv_heads, ranks share kv
    heads, so the kv projections are replicated and each rank uses its rows."""

    n_local_heads: int
    n_local_kv_heads: int
    kv_start: int  # first global kv head this rank uses
    kv_sharded: bool  # kv projections Shard(0) (True) or replicated (False)
    kv_for_head: tuple  # local kv head read by each local query head

    @property
    def uniform_groups(self) -> bool:
        return self.n_local_heads % self.n_local_kv_heads == 0 and self.kv_for_head == tuple(
            i // (self.n_local_heads // self.n_local_kv_heads) for i in range(self.n_local_heads)
        )


def head_layout(n_heads: int, n_kv_heads: int, tp_mesh: Optional[DeviceMesh]) -> HeadLayout:
    tp, rank = tp_size(tp_mesh), tp_rank(tp_mesh)
    check_tp_divides_heads(n_heads, tp)
    n_local = n_heads // tp
    group = n_heads // n_kv_heads  # query heads per kv head
    first_head = rank * n_local
    kv_of = [(first_head + i) // group for i in range(n_local)]
    kv_start = kv_of[0]
    n_local_kv = kv_of[-1] - kv_start + 1
    return HeadLayout(
        n_local_heads=n_local,
        n_local_kv_heads=n_local_kv,
        kv_start=kv_start,
        kv_sharded=n_kv_heads % tp == 0,
        kv_for_head=tuple(k - kv_start for k in kv_of),
    )


def check_tp_divides_heads(n_heads: int, tp: int) -> None:
    if n_heads % tp:
        valid = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
        raise ValueError(
            f"tensor-parallel size {tp} must divide n_heads {n_heads} (whole heads per rank); valid tp sizes: {valid}"
        )


def _nf4_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T with W a frozen NF4 shard (QLoRA, llama/qlora.py): torchao's linear_nf4
    dequantises W to x's dtype for the matmul, and again in backward, saving only the NF4
    codes. torchao is optional; a layer only holds an NF4 weight once it is imported."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

    return linear_nf4(x, weight)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with the output features split across tp ranks (W is Shard(0)). Its input
    must come from a `RegionInput`. With `replicated_rows=(start, stop)` every rank holds
    the whole W and uses only those rows: kv heads shared by several ranks.

    With a LoRA adapter (`add_lora`), A is replicated and B is split like W's rows, so each
    rank computes the whole update of its own output features and no collective is added.
    A's gradient on a rank is its share (through its rows of B): see `sum_adapter_gradients`."""

    def __init__(self, in_features: int, out_features: int, tp_mesh: Optional[DeviceMesh] = None, replicated_rows=None):
        super().__init__()
        self.tp_mesh = tp_mesh
        self.replicated_rows = replicated_rows
        placement = Replicate() if replicated_rows is not None else Shard(0)
        if replicated_rows is None and out_features % tp_size(tp_mesh):
            raise ValueError(f"ColumnParallelLinear: tp size {tp_size(tp_mesh)} must divide out_features {out_features}")
        self.weight = sharded_parameter((out_features, in_features), tp_mesh, placement)
        self.lora: Optional[LoRA] = None
        self.nf4 = False  # weight: this rank's rows as a plain NF4Tensor (llama/qlora.py)

    def add_lora(self, lora: LoRA) -> None:
        out_features, in_features = self.weight.shape
        self.lora = lora
        self.lora_a = sharded_parameter((lora.rank, in_features), self.tp_mesh, Replicate())
        rows = Replicate() if self.replicated_rows is not None else Shard(0)
        self.lora_b = sharded_parameter((out_features, lora.rank), self.tp_mesh, rows)

    def local_weight(self) -> torch.Tensor:
        if self.nf4:  # quantised from this rank's rows only (its replicated_rows too)
            return self.weight
        if self.replicated_rows is None:
            return local_tensor(self.weight)
        start, stop = self.replicated_rows
        return local_tensor(self.weight, partial_grad=True)[start:stop]

    def lora_operands(self) -> LoRAOperands:
        b = local_tensor(self.lora_b)
        if self.replicated_rows is not None:
            b = b[self.replicated_rows[0] : self.replicated_rows[1]]  # its share: sum_adapter_gradients
        return LoRAOperands(self.local_weight(), local_tensor(self.lora_a), b, self.nf4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora is not None:
            return linears_with_lora(x, [self.lora_operands()], self.lora, self.training)[0]
        if self.nf4:
            return _nf4_linear(x, self.weight)
        return F.linear(x, self.local_weight())


def shared_input_linears(x: torch.Tensor, *layers: ColumnParallelLinear) -> list:
    """layer(x) of each column-parallel layer reading the same x (wq, wk, wv; w1, w3). Their
    adapters (one LoRA for all) run together: one x A^T for all of them, and in backward
    one accumulation of x's gradient over every base and adapter term
    (parallel/lora_layers.py). Layers without an adapter run as they are."""
    adapted = [layer for layer in layers if layer.lora is not None]
    if len(adapted) < 2 or any(layer.lora != adapted[0].lora for layer in adapted):
        return [layer(x) for layer in layers]
    lora, training = adapted[0].lora, adapted[0].training
    outputs = iter(linears_with_lora(x, [layer.lora_operands() for layer in adapted], lora, training))
    return [next(outputs) if layer.lora is not None else layer(x) for layer in layers]


class RowParallelLinear(nn.Module):
    """y = x W^T with the input features split across tp ranks (W is Shard(1)); the
    partial products are summed across ranks: all-reduce, or reduce-scatter along the
    sequence with sequence parallelism.

    With a LoRA adapter (`add_lora`), A is split like W's columns and B is replicated: each
    rank's x A^T is a partial sum, and its product with B joins W's partial output in the
    same reduction, so no collective is added. B's gradient on a rank is its share (through
    its part of x A^T): see `sum_adapter_gradients`."""

    def __init__(self, in_features, out_features, tp_mesh: Optional[DeviceMesh] = None, sequence_parallel=False):
        super().__init__()
        if in_features % tp_size(tp_mesh):
            raise ValueError(f"RowParallelLinear: tp size {tp_size(tp_mesh)} must divide in_features {in_features}")
        self.tp_mesh = tp_mesh
        self.sequence_parallel = sequence_parallel
        self.weight = sharded_parameter((out_features, in_features), tp_mesh, Shard(1))
        self.lora: Optional[LoRA] = None
        self.nf4 = False  # weight: this rank's columns as a plain NF4Tensor (llama/qlora.py)

    def add_lora(self, lora: LoRA) -> None:
        out_features, in_features = self.weight.shape
        self.lora = lora
        self.lora_a = sharded_parameter((lora.rank, in_features), self.tp_mesh, Shard(1))
        self.lora_b = sharded_parameter((out_features, lora.rank), self.tp_mesh, Replicate())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora is not None:
            operands = LoRAOperands(self.weight if self.nf4 else local_tensor(self.weight), local_tensor(self.lora_a),
                                    local_tensor(self.lora_b), self.nf4)
            y = linears_with_lora(x, [operands], self.lora, self.training)[0]
        else:
            y = _nf4_linear(x, self.weight) if self.nf4 else F.linear(x, local_tensor(self.weight))
        return _leave_region(y, self.tp_mesh, self.sequence_parallel)


def adapter_gradient_shares(module: nn.Module) -> list:
    """The LoRA factors whose gradient each tp rank computes only in part while they are
    replicated over tp: A of a column-parallel layer, B of a row-parallel one (and B of a
    column-parallel layer with replicated rows). Their tp ranks' gradients add up to the
    whole: `sum_adapter_gradients`."""
    shares = []
    for layer in module.modules():
        if getattr(layer, "lora", None) is None or tp_size(layer.tp_mesh) == 1:
            continue
        if isinstance(layer, ColumnParallelLinear):
            shares.append((layer.tp_mesh, layer.lora_a))
            if layer.replicated_rows is not None:
                shares.append((layer.tp_mesh, layer.lora_b))
        elif isinstance(layer, RowParallelLinear):
            shares.append((layer.tp_mesh, layer.lora_b))
    return shares


@torch.no_grad()
def sum_adapter_gradients(module: nn.Module) -> int:
    """Sum the tp ranks' shares of the replicated LoRA factors' gradients, in place, with
    one all-reduce per tp mesh for all of them, once per optimizer step (after the last
    micro-step's backward, before clipping): the blocks' forward and backward keep
    Megatron's collectives only. Under FSDP the gradients are this rank's dp shards, cut
    alike on every tp rank, so their sum is the shard of the sum. Returns how many
    gradients it summed (0 without LoRA or tp)."""
    by_mesh: dict = {}
    for mesh, param in adapter_gradient_shares(module):
        if param.grad is not None:
            grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            by_mesh.setdefault(mesh, []).append(grad)
    for mesh, grads in by_mesh.items():
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), mesh)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    return sum(len(g) for g in by_mesh.values())


def check_vocab(vocab_size: int, tp: int) -> None:
    if vocab_size % tp:
        raise ValueError(f"tensor-parallel size {tp} must divide vocab_size {vocab_size} (the vocabulary is split by rows)")


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split by rows (Shard(0)): each rank looks up the ids
    it owns, zeros the rest, and the ranks' rows are summed on the way out."""

    def __init__(self, vocab_size: int, dim: int, tp_mesh: Optional[DeviceMesh] = None, sequence_parallel=False):
        super().__init__()
        check_vocab(vocab_size, tp_size(tp_mesh))
        self.tp_mesh = tp_mesh
        self.sequence_parallel = sequence_parallel
        self.vocab_start = tp_rank(tp_mesh) * (vocab_size // tp_size(tp_mesh))
        self.weight = sharded_parameter((vocab_size, dim), tp_mesh, Shard(0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = local_tensor(self.weight)
        if tp_size(self.tp_mesh) == 1:
            return F.embedding(tokens, weight)
        ids = tokens - self.vocab_start
        owned = (ids >= 0) & (ids < weight.shape[0])
        rows = F.embedding(ids.clamp(0, weight.shape[0] - 1), weight) * owned.unsqueeze(-1).to(weight.dtype)
        return _leave_region(rows, self.tp_mesh, self.sequence_parallel)


class VocabParallelOutput(nn.Module):
    """The LM head: logits for this rank's slice of the vocabulary (W is Shard(0)). Returns a
    DTensor sharded on the vocabulary dimension; the full-vocab logits are never built."""

    def __init__(self, dim: int, vocab_size: int, tp_mesh: Optional[DeviceMesh] = None, sequence_parallel=False, weight=None):
        super().__init__()
        check_vocab(vocab_size, tp_size(tp_mesh))
        self.tp_mesh = tp_mesh
        self.enter = RegionInput(tp_mesh, sequence_parallel)
        self.weight = weight if weight is not None else sharded_parameter((vocab_size, dim), tp_mesh, Shard(0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self.enter(h), local_tensor(self.weight))
        if self.tp_mesh is None:
            return logits
        return DTensor.from_local(logits, self.tp_mesh, [Shard(logits.ndim - 1)], run_check=False)
