"""The math of LoRA-adapted linear layers, on local shards: y_i = x W_i^T + scale *
dropout(x) A_i^T B_i^T for one or several projections that read the same x (wq, wk, wv;
w1, w3), in one autograd Function.

Why a Function of its own: the adapters' products are thin (rank 16) and cost what reading
and writing their (tokens, features) operands costs, not their FLOPs; autograd op by op
re-reads x for every adapter, copies each base output into the addmm that adds the
update, and sums the input gradient of every base and adapter term in a separate pass.
Here, for the projections of one input,

  forward   x_a = x [A_1; A_2; ...]^T                one product for all adapters
            y_i = x W_i^T, then y_i += scale x_a,i B_i^T in place
  backward  g_a = scale [g_1 B_1, g_2 B_2, ...]       (tokens, n rank), small
            grad x = g_1 W_1 + g_2 W_2 + ... + g_a [A_1; A_2; ...], accumulated in place
            grad [A_1; A_2; ...] = g_a^T x          one product for all adapters
            grad B_i = scale g_i^T x_a,i

the same sums as the op-by-op graph (tests/test_lora_update.py holds both to the written
out formula). A frozen W gets no gradient; a trainable one (not in a LoRA run, where
llama/lora.py freezes the base; tests) gets g_i^T x. The layers (parallel/layers.py) hand
their local shards; placements and collectives stay theirs. Ground floor: torch only."""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LoRA:
    """A low-rank update of a frozen linear layer (Hu et al. 2021): y = x W^T + scale *
    dropout(x) A^T B^T, A of shape (rank, in), B of shape (out, rank)."""

    rank: int
    scale: float
    dropout: float = 0.0


@dataclass(frozen=True)
class LoRAOperands:
    """One adapted projection's local tensors: W (dense, or a frozen NF4Tensor: QLoRA), A, B."""

    weight: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    nf4: bool = False


def _dense(weight: torch.Tensor, nf4: bool, dtype: torch.dtype) -> torch.Tensor:
    """W for a matmul in `dtype`: an NF4 weight is dequantised for each use and not kept,
    as torchao's linear_nf4 does (forward and again in backward)."""
    return weight.to(dtype) if nf4 else weight


def _accumulate_product(out: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, alpha: float = 1.0) -> None:
    """out += alpha m1 m2 inside the GEMM (beta 1). Written as addmm with out= rather than
    addmm_: the same kernel, but an op that torch's FlopCounterMode and the profiler's
    matmul names (bench/) count, where addmm_ is neither."""
    torch.addmm(out, m1, m2, alpha=alpha, out=out)


class _LinearsWithLoRA(torch.autograd.Function):
    """y_i = x W_i^T + scale x_lora A_i^T B_i^T for i = 1..n; x_lora None: x itself (no
    dropout), whose input gradient then takes every term in one accumulation."""

    @staticmethod
    def forward(ctx, x, x_lora, scale: float, rank: int, nf4: tuple, *params):
        weights, a_s, b_s = params[0::3], params[1::3], params[2::3]
        x2 = x.reshape(-1, x.shape[-1])
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1])
        a_cat = a_s[0] if len(a_s) == 1 else torch.cat(a_s)
        x_a = torch.mm(xl2, a_cat.t())  # (tokens, n rank)
        outputs = []
        for i, (weight, b) in enumerate(zip(weights, b_s)):
            y = torch.mm(x2, _dense(weight, nf4[i], x2.dtype).t())
            _accumulate_product(y, x_a[:, i * rank : (i + 1) * rank], b.t(), alpha=scale)
            outputs.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.scale, ctx.rank, ctx.nf4, ctx.shared, ctx.n = scale, rank, nf4, x_lora is None, len(weights)
        ctx.x_shape = x.shape
        ctx.save_for_backward(x2, None if x_lora is None else xl2, x_a, a_cat, *weights, *b_s)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        x2, xl2, x_a, a_cat, *rest = ctx.saved_tensors
        n, rank, scale = ctx.n, ctx.rank, ctx.scale
        weights, b_s = rest[:n], rest[n:]
        xl2 = x2 if ctx.shared else xl2
        needs = ctx.needs_input_grad
        gs = [g.reshape(-1, g.shape[-1]) for g in grads]
        # the adapters' input gradients, (tokens, n rank): thin, scaled once here
        g_a = torch.cat([torch.mm(g, b) for g, b in zip(gs, b_s)], dim=1) if n > 1 else torch.mm(gs[0], b_s[0])
        g_a.mul_(scale)
        grad_x = grad_x_lora = None
        if needs[0]:
            grad_x = torch.mm(gs[0], _dense(weights[0], ctx.nf4[0], gs[0].dtype))
            for i in range(1, n):
                _accumulate_product(grad_x, gs[i], _dense(weights[i], ctx.nf4[i], gs[i].dtype))
            if ctx.shared:
                _accumulate_product(grad_x, g_a, a_cat)
            grad_x = grad_x.view(ctx.x_shape)
        if not ctx.shared and needs[1]:
            grad_x_lora = torch.mm(g_a, a_cat).view(ctx.x_shape)
        grad_a_cat = torch.mm(g_a.t(), xl2)  # (n rank, in): one product for every A
        grad_params = []
        for i in range(n):
            w_index = 5 + 3 * i
            grad_w = torch.mm(gs[i].t(), x2) if needs[w_index] else None
            grad_a = grad_a_cat[i * rank : (i + 1) * rank] if needs[w_index + 1] else None
            grad_b = torch.mm(gs[i].t(), x_a[:, i * rank : (i + 1) * rank]).mul_(scale) if needs[w_index + 2] else None
            grad_params += [grad_w, grad_a, grad_b]
        return (grad_x, grad_x_lora, None, None, None, *grad_params)


def lora_input(x: torch.Tensor, lora: LoRA, training: bool) -> torch.Tensor:
    """The adapter's input: dropout applies to it only, not to the base's."""
    return F.dropout(x, lora.dropout, training) if lora.dropout else x


def linears_with_lora(x: torch.Tensor, projections: Sequence[LoRAOperands], lora: LoRA, training: bool) -> list:
    """y_i = x W_i^T + scale * dropout(x) A_i^T B_i^T of each projection reading x. Without
    active dropout all of them run as one Function; with it, each draws its own mask (as
    separate layers do, in the projections' order) and runs as its own."""
    if lora.dropout and training:
        return [_apply(x, lora_input(x, lora, training), lora, [p])[0] for p in projections]
    return list(_apply(x, None, lora, projections))


def _apply(x: torch.Tensor, x_lora: Optional[torch.Tensor], lora: LoRA, projections) -> tuple:
    params = [t for p in projections for t in (p.weight, p.lora_a, p.lora_b)]
    nf4 = tuple(p.nf4 for p in projections)
    return _LinearsWithLoRA.apply(x, x_lora, lora.scale, lora.rank, nf4, *params)
