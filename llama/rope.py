"""Rotary position embedding in Meta's layout: interleaved pairs (x0, x1), (x2, x3), ...
rotate together. Meta's reference multiplies complex numbers; here the same rotation is
real arithmetic, which inductor can fuse into one kernel (it cannot fuse complex ops)."""

import math
from typing import NamedTuple

import torch

from .config import ModelArgs


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,), with Llama 3 scaling when the config asks for it."""
    d = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    if not args.use_scaled_rope:
        return freqs
    factor, low, high = args.rope_scale_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    context = args.rope_original_context
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > context / low, freqs / factor, blended)
    return torch.where(wavelen < context / high, freqs, scaled)


def rope_table(args: ModelArgs, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (seq_len, head_dim / 2) in float32."""
    freqs = rope_frequencies(args).to(device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)


class FreqsCis(NamedTuple):
    """cis(angle) = cos + i sin of each position and pair, laid out for the rotation in real
    arithmetic: tables over the whole head_dim, broadcast over heads, (..., seq, 1, head_dim)
    for cos and head_dim - 1 for the two shifted sine tables. Meta's name for the complex
    table; built once per forward and read by every layer."""

    cos: torch.Tensor
    sin_next: torch.Tensor  # -sin at even positions, multiplying the next element
    sin_prev: torch.Tensor  # +sin at odd positions, multiplying the previous element


def rotation_tables(cos: torch.Tensor, sin: torch.Tensor) -> FreqsCis:
    """The rotation tables of rows of `rope_table`: cos/sin (seq, head_dim / 2), or (batch,
    seq, head_dim / 2) when positions differ per sequence (e.g. restart per document)."""
    zeros = torch.zeros_like(sin)
    return FreqsCis(
        cos=cos.repeat_interleave(2, dim=-1).unsqueeze(-2),
        sin_next=torch.stack((-sin, zeros), dim=-1).flatten(-2)[..., :-1].unsqueeze(-2),
        sin_prev=torch.stack((zeros, sin), dim=-1).flatten(-2)[..., 1:].unsqueeze(-2),
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_next: torch.Tensor, sin_prev: torch.Tensor) -> torch.Tensor:
    # out[2i] = x[2i] cos_i - x[2i+1] sin_i and out[2i+1] = x[2i+1] cos_i + x[2i] sin_i, as
    # products of x with itself shifted by one element: contiguous views that eager CPU
    # kernels vectorize, where even/odd views (stride 2) run element by element. The
    # shifted tables are zero where a product would cross into the neighbouring pair.
    out = x * cos
    out[..., :-1].addcmul_(x[..., 1:], sin_next)
    out[..., 1:].addcmul_(x[..., :-1], sin_prev)
    return out


class _Rotation(torch.autograd.Function):
    """Its backward is the inverse rotation (a rotation's transpose), computed like the
    forward, instead of autograd's trace back through the in-place views."""

    @staticmethod
    def forward(ctx, x, cos, sin_next, sin_prev):
        ctx.save_for_backward(cos, sin_next, sin_prev)
        return _rotate(x, cos, sin_next, sin_prev)

    @staticmethod
    def backward(ctx, grad):
        cos, sin_next, sin_prev = ctx.saved_tensors
        return _rotate(grad, cos, -sin_next, -sin_prev), None, None, None


def rotate(x: torch.Tensor, freqs_cis: FreqsCis) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim), rotated in float32 and returned in x's dtype."""
    return _Rotation.apply(x.float(), *freqs_cis).type_as(x)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: FreqsCis) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys rotated by their positions' angles, as Meta's function of this name."""
    return rotate(xq, freqs_cis), rotate(xk, freqs_cis)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One tensor rotated by rows of `rope_table` (see rotation_tables), its tables
    built here: for tests and benchmarks. The model builds them once per forward."""
    return rotate(x, rotation_tables(cos, sin))
