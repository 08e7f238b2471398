"""Context parallelism, all-gather based as in Llama 3: the one place that knows the cp
split and calls its collectives. The model only asks for them (llama/model.py).

The sequence is cut into 2C chunks for C cp ranks; rank r keeps chunks r and 2C-1-r,
side by side. Under a causal mask a query's work grows with its position, so pairing an
early chunk with a late one gives every rank the same number of query-key pairs:

    seq 8, C 2:   chunks  [0 1 | 2 3 | 4 5 | 6 7]
                  rank 0  [0 1 6 7]      rank 1  [2 3 4 5]

In attention each rank all-gathers K and V over cp (small with GQA: n_kv_heads of
n_heads), puts them back in sequence order, and attends its own queries against the whole
sequence with a mask built from global positions. Backward reduce-scatters dK and dV:
each rank's keys were read by every rank's queries.

Everything a rank sees of the sequence (tokens, targets, document ids, positions) is split
with `split_for_cp`; `gather_for_cp` is its inverse. Parameters see only part of the
sequence per rank, so their gradients are partial sums over cp: FSDP treats cp ranks as
data-parallel ranks and sums them.
"""

from typing import Optional

import torch
from torch.distributed.device_mesh import DeviceMesh

from parallel.compat import all_gather_stacked, all_reduce_sum, reduce_scatter_stacked


def cp_size(mesh: Optional[DeviceMesh]) -> int:
    return 1 if mesh is None else mesh.size()


def cp_rank(mesh: Optional[DeviceMesh]) -> int:
    return 0 if mesh is None else mesh.get_local_rank()


def check_cp_divides(seq_len: int, cp: int) -> None:
    """The one check of the sequence length under cp, for train.py, the planner and the
    split; at cp 1 nothing is cut, so any length will do."""
    if cp > 1 and seq_len % (2 * cp):
        raise ValueError(
            f"--seq-len {seq_len} must be a multiple of 2 x --cp = {2 * cp}: context parallelism "
            "splits each sequence into 2 x cp chunks, rank r taking chunks r and 2cp-1-r"
        )


def check_sequence_parallel_divides(seq_len: int, cp: int, tp: int, sequence_parallel: bool) -> None:
    """Sequence parallelism splits each rank's part of the sequence (all of it, or 1/cp) over
    the tp ranks between blocks, so that part must divide by tp."""
    local = seq_len // cp
    if sequence_parallel and tp > 1 and local % tp:
        tokens = f"--seq-len {seq_len}" if cp == 1 else f"--seq-len {seq_len} / --cp {cp} = {local} tokens per rank"
        raise ValueError(
            f"{tokens} must be a multiple of --tp {tp}: sequence parallelism (on by default) splits it over the "
            "tp ranks; choose such a --seq-len, or pass --no-sequence-parallel"
        )


def rank_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The two chunks (of 2 * cp) that a cp rank holds: an early one and its mirror."""
    return rank, 2 * cp - 1 - rank


def split_for_rank(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s part of x along `dim`: chunks r and 2C-1-r of 2C, concatenated."""
    check_cp_divides(x.shape[dim], cp)
    if cp == 1:
        return x
    chunks = x.chunk(2 * cp, dim)
    first, second = rank_chunks(cp, rank)
    return torch.cat([chunks[first], chunks[second]], dim)


def restore_order(gathered: torch.Tensor, cp: int, dim: int = 1) -> torch.Tensor:
    """Inverse of the split: `gathered` holds every rank's part in rank order along `dim`
    ([chunk 0, chunk 2C-1 | chunk 1, chunk 2C-2 | ...]); returns the chunks in sequence order."""
    if cp == 1:
        return gathered
    pieces = gathered.chunk(2 * cp, dim)  # pieces 2r and 2r+1 are rank r's two chunks
    in_order = [pieces[2 * c] if c < cp else pieces[2 * (2 * cp - 1 - c) + 1] for c in range(2 * cp)]
    return torch.cat(in_order, dim)


def positions_for_rank(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """(seq_len / cp,) the global positions of a rank's tokens, for RoPE and masks."""
    return split_for_rank(torch.arange(seq_len, device=device), cp, rank, dim=0)


def key_prefixes_for_rank(seq_len: int, cp: int, rank: int) -> tuple:
    """(query rows, keys they can see) for each of a rank's two chunks, in host integers:
    under a causal mask the queries of chunk c read only the first (c + 1) chunks of keys."""
    chunk = seq_len // (2 * cp)
    return tuple((chunk, (c + 1) * chunk) for c in rank_chunks(cp, rank))


def cp_key_prefixes(seq_len: int, cp_mesh: Optional[DeviceMesh]) -> tuple:
    """`key_prefixes_for_rank` of this cp rank."""
    return key_prefixes_for_rank(seq_len, cp_size(cp_mesh), cp_rank(cp_mesh))


def split_for_cp(x: torch.Tensor, cp_mesh: Optional[DeviceMesh], dim: int = 1) -> torch.Tensor:
    """This rank's part of a whole-sequence tensor (tokens, targets, document ids)."""
    return split_for_rank(x, cp_size(cp_mesh), cp_rank(cp_mesh), dim)


def cp_positions(seq_len: int, cp_mesh: Optional[DeviceMesh], device=None) -> torch.Tensor:
    """(seq_len / cp,) global positions of this rank's tokens in a sequence of seq_len."""
    return positions_for_rank(seq_len, cp_size(cp_mesh), cp_rank(cp_mesh), device)


# The cp collectives run on dim 0 of ranks' parts stacked (parallel/compat.py), so that
# putting the chunks in sequence order, and back in rank order for the gradient, is the one
# copy: gathering along `dim` first and then reordering would copy twice for batch > 1.


def sequence_from_ranks(stacked: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """(cp, ...) every rank's part -> the whole sequence along `dim`, in order: one copy."""
    cp = stacked.shape[0]
    halves = [part.chunk(2, dim) for part in stacked.unbind(0)]
    return torch.cat([halves[r][0] for r in range(cp)] + [halves[r][1] for r in reversed(range(cp))], dim)


def ranks_from_sequence(x: torch.Tensor, cp: int, dim: int = 1) -> torch.Tensor:
    """Inverse of sequence_from_ranks: (cp, ...) each rank's part, written in one pass."""
    chunks = x.chunk(2 * cp, dim)
    chunk = chunks[0].shape[dim]
    out = x.new_empty((cp, *x.shape[:dim], 2 * chunk, *x.shape[dim + 1 :]))
    for r in range(cp):
        first, second = rank_chunks(cp, r)
        out[r].narrow(dim, 0, chunk).copy_(chunks[first])
        out[r].narrow(dim, chunk, chunk).copy_(chunks[second])
    return out


class _AllGatherSequence(torch.autograd.Function):
    """The whole sequence along `dim` from every cp rank's part; backward reduce-scatters
    the gradient, summing what every rank's queries contributed to this rank's keys and
    values."""

    @staticmethod
    def forward(ctx, x, dim, mesh):
        ctx.dim, ctx.mesh = dim, mesh
        return sequence_from_ranks(all_gather_stacked(x, mesh), dim)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_stacked(ranks_from_sequence(grad, ctx.mesh.size(), ctx.dim), ctx.mesh), None, None


def gather_for_cp(x: torch.Tensor, cp_mesh: Optional[DeviceMesh], dim: int = 1) -> torch.Tensor:
    """The whole sequence, in order, from every rank's split part; differentiable (backward
    reduce-scatters). Used for K and V in attention, document ids, and logits in tests."""
    if cp_size(cp_mesh) == 1:
        return x
    if not x.requires_grad:
        # ids and positions: a plain all-gather, no autograd node
        return sequence_from_ranks(all_gather_stacked(x, cp_mesh), dim)
    return _AllGatherSequence.apply(x, dim, cp_mesh)


class _SumOverRanks(torch.autograd.Function):
    """A sum over a mesh's ranks that every rank then uses alike: backward sums the ranks'
    gradients, so each rank's part gets the whole gradient of what all ranks computed."""

    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return all_reduce_sum(x, mesh)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad, ctx.mesh), None


def sum_over_cp(x: torch.Tensor, cp_mesh: Optional[DeviceMesh]) -> torch.Tensor:
    """Per-sequence sums (a response's log-probability) from every cp rank's part of the
    sequences; differentiable. Each cp rank then computes the same nonlinear loss of the
    sums, and counts 1/cp of it, so that the shares add up to the loss once (backward's
    sum of the ranks' gradients gives each part the whole loss's gradient)."""
    if cp_size(cp_mesh) == 1:
        return x
    if not x.requires_grad:
        return all_reduce_sum(x, cp_mesh)
    return _SumOverRanks.apply(x, cp_mesh)
