"""Cross-entropy on the output layer's logits, vocab-parallel under tensor parallelism:
the full-vocabulary logits are never gathered.

`vocab_parallel_cross_entropy` gives the summed or mean token loss (next-token training)
or, with reduction="none", each token's loss: what a sequence's log-probability is summed
from (DPO: llama/training/preference.py). Both autograd functions compute per-token losses;
the reduction is ordinary autograd around them."""

import torch
from torch.distributed.tensor import DTensor

from parallel.compat import all_gather_along
from parallel.layers import tp_rank, tp_size

REDUCTIONS = ("mean", "sum", "none")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy on vocab-sharded logits with one small collective: each rank
    gathers every rank's (log-sum-exp, target logit) per token, never the logits themselves.
    The losses are the same on every tp rank; their gradient needs no collective."""

    @staticmethod
    def forward(ctx, logits, targets, mesh, ignore_index):
        n_local = logits.shape[-1]
        vocab_start = tp_rank(mesh) * n_local
        x = logits.float()
        local_max = x.amax(dim=-1)
        # exp(x - local max) is kept for backward: one multiply there instead of exp again
        exps = (x - local_max.unsqueeze(-1)).exp_()
        local_lse = local_max + exps.sum(-1).log()
        ids = targets - vocab_start
        owned = (ids >= 0) & (ids < n_local)
        ids = ids.clamp(0, n_local - 1)
        target_logit = x.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * owned
        stats = torch.stack([local_lse, target_logit]).unsqueeze(0)  # (1, 2, tokens)
        if tp_size(mesh) > 1:
            stats = all_gather_along(stats, 0, mesh)
        lse = torch.logsumexp(stats[:, 0], dim=0)
        valid = targets != ignore_index
        losses = (lse - stats[:, 1].sum(0)) * valid
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(exps, local_max - lse, ids, owned & valid, valid)
        return losses

    @staticmethod
    def backward(ctx, grad):
        exps, log_rescale, ids, owned, valid = ctx.saved_tensors
        # softmax over the whole vocabulary, this rank's slice: exp(x - max) * exp(max - lse)
        per_token = valid.to(exps.dtype) * grad
        # in place: exps is this function's own buffer, and backward runs once (as in
        # Megatron's); a new (tokens, vocab / tp) buffer costs a pass and page faults
        probs = exps.mul_((log_rescale.exp() * per_token).unsqueeze(-1))
        probs.scatter_add_(-1, ids.unsqueeze(-1), -(owned.to(probs.dtype) * per_token).unsqueeze(-1))
        return probs.to(ctx.logits_dtype), None, None, None


# fp32 logits of one chunk of tokens: 256 MiB is ~520 tokens of Llama 3's 128256-word
# vocabulary, where the whole of an 8K-token sequence would take 4 GiB
CROSS_ENTROPY_CHUNK_BYTES = 1 << 28


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of whole-vocabulary (tokens, vocab) logits in their own
    dtype, a chunk of tokens at a time: the fp32 softmax exists for one chunk only, in the
    forward and in the backward, which recomputes it from the saved logits and log-sum-exps."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, chunk):
        valid = targets != ignore_index
        ids = torch.where(valid, targets, 0)
        lse = torch.cat([torch.logsumexp(rows.float(), dim=-1) for rows in logits.split(chunk)])
        target_logits = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()
        losses = torch.where(valid, lse - target_logits, 0.0)
        ctx.save_for_backward(logits, ids, valid, lse)
        ctx.chunk = chunk
        return losses

    @staticmethod
    def backward(ctx, grad):
        logits, ids, valid, lse = ctx.saved_tensors
        per_token = torch.where(valid, grad, 0.0)
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            # d loss / d logits = softmax - one_hot(target), per token
            probs = (logits[rows].float() - lse[rows, None]).exp_()
            probs.scatter_add_(-1, ids[rows, None], probs.new_full((probs.shape[0], 1), -1.0))
            grad_logits[rows] = probs.mul_(per_token[rows, None])
        return grad_logits, None, None, None


def _reduce(losses: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses.view(targets.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != ignore_index).sum().clamp(min=1).to(losses.dtype)


def chunked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean", chunk_tokens=None
) -> torch.Tensor:
    """F.cross_entropy of plain (..., vocab) logits in fp32, without an fp32 copy of all of
    them: `chunk_tokens` rows at a time (default: CROSS_ENTROPY_CHUNK_BYTES of fp32)."""
    vocab = logits.shape[-1]
    chunk = chunk_tokens or max(1, CROSS_ENTROPY_CHUNK_BYTES // (4 * vocab))
    losses = _ChunkedCrossEntropy.apply(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index, chunk)
    return _reduce(losses, targets, ignore_index, reduction)


def vocab_parallel_cross_entropy(logits, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"):
    """Cross-entropy of (batch, seq, vocab) logits, vocab-sharded DTensor or plain tensor;
    equal to F.cross_entropy on the gathered logits. `reduction="sum"` lets a caller
    normalise by a token count it knows better (e.g. the global batch's); "none" gives each
    token's loss, shaped like `targets` (0 where ignored), the same on every tp rank."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if not isinstance(logits, DTensor):
        return chunked_cross_entropy(logits, targets, ignore_index, reduction)
    local = logits.to_local()
    losses = _VocabParallelCrossEntropy.apply(
        local.reshape(-1, local.shape[-1]), targets.reshape(-1), logits.device_mesh, ignore_index
    )
    return _reduce(losses, targets, ignore_index, reduction)
