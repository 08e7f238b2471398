"""Llama 3, tensor-parallel by construction.

Reads like Meta's reference model.py, with Meta's parameter names. Each module is
given the tp mesh (or None) and takes its layers from `parallel.layers`, which own
the sharding and the collectives; the math here runs on local shards:
  attention  wq/wk/wv column-parallel (whole heads per rank), wo row-parallel
  MLP        w1/w3 column-parallel, w2 row-parallel
  vocab      tok_embeddings and output split by vocabulary rows
With sequence parallelism the residual stream is split along the sequence between
blocks, and the norms run on the local part of it.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate

from parallel.context import cp_key_prefixes, cp_positions, cp_size, gather_for_cp, split_for_cp
from parallel.layers import (
    ColumnParallelLinear,
    RegionInput,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelOutput,
    check_tp_divides_heads,
    check_vocab,
    fill_normal_,
    head_layout,
    local_tensor,
    sequence_parallel_weight,
    shared_input_linears,
    sharded_parameter,
    tp_size,
)

from .config import ModelArgs
from .lora import init_adapters_, is_adapter
from .masks import (
    DocumentMask, causal_mask, check_document_ids, context_parallel_mask, document_mask, document_positions,
    gqa_needs_expanded_kv, masked_attention)
from .norm import rms_norm
from .rope import FreqsCis, apply_rotary_emb, rope_table, rotation_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, tp_mesh: Optional[DeviceMesh] = None, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        # under sequence parallelism each rank normalises part of the sequence, so its
        # weight gradient is a share of the total, summed over tp in backward
        self.tp_mesh = tp_mesh if sequence_parallel else None
        self.weight = sharded_parameter((dim,), tp_mesh, Replicate())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = sequence_parallel_weight(self.weight, self.tp_mesh)
        if x.dtype == torch.float32:
            # same values in fewer passes over x (a fused kernel on CUDA, a hand-written
            # backward on CPU); other dtypes round the normalised x before the weight
            if x.device.type == "cpu":
                return rms_norm(x, weight, self.eps)
            return F.rms_norm(x, weight.shape, weight, self.eps)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * weight


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding: per layer,
    (batch, max_seq, n_local_kv_heads, head_dim), this rank's kv heads only, so the cache
    is split across tp ranks like wk and wv. `Transformer.new_kv_cache` allocates one."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[1]


def offset_causal_mask(seqlen: int, start_pos: int, device) -> Optional[torch.Tensor]:
    """Causal mask for queries at positions start_pos.. over keys at 0..: SDPA's is_causal
    aligns the two top-left, which is only right when start_pos is 0. One query sees all."""
    if seqlen == 1:
        return None
    query_pos = torch.arange(start_pos, start_pos + seqlen, device=device)
    return torch.arange(start_pos + seqlen, device=device)[None, :] <= query_pos[:, None]


class Attention(nn.Module):
    def __init__(
        self, args: ModelArgs, tp_mesh: Optional[DeviceMesh] = None, sequence_parallel: bool = False,
        cp_mesh: Optional[DeviceMesh] = None,
    ):
        super().__init__()
        self.cp_mesh = cp_mesh  # context parallelism: keys and values come from every cp rank
        self.head_dim = args.head_dim
        self.layout = head_layout(args.n_heads, args.n_kv_heads, tp_mesh)
        kv_dim = args.n_kv_heads * args.head_dim
        kv_rows = None
        if not self.layout.kv_sharded:
            start = self.layout.kv_start * args.head_dim
            kv_rows = (start, start + self.layout.n_local_kv_heads * args.head_dim)

        self.enter = RegionInput(tp_mesh, sequence_parallel)
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * args.head_dim, tp_mesh)
        self.wk = ColumnParallelLinear(args.dim, kv_dim, tp_mesh, replicated_rows=kv_rows)
        self.wv = ColumnParallelLinear(args.dim, kv_dim, tp_mesh, replicated_rows=kv_rows)
        self.wo = RowParallelLinear(args.n_heads * args.head_dim, args.dim, tp_mesh, sequence_parallel)
        self._kv_index = None  # kv_for_head on the device, built on first use

    def kv_index(self, device) -> torch.Tensor:
        """The local kv head of each local query head, as a device tensor: built once, not
        copied from the host in every layer's forward."""
        if self._kv_index is None or self._kv_index.device != torch.device(device):
            self._kv_index = torch.tensor(self.layout.kv_for_head, device=device)
        return self._kv_index

    def forward(
        self, x: torch.Tensor, freqs_cis: FreqsCis, start_pos: int = 0, kv_cache=None,
        mask: Optional[DocumentMask] = None,
    ):
        x = self.enter(x)
        bsz, seqlen, _ = x.shape
        xq, xk, xv = shared_input_linears(x, self.wq, self.wk, self.wv)  # LoRA: one x A^T for the three
        xq = xq.view(bsz, seqlen, self.layout.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.layout.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.layout.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        if cp_size(self.cp_mesh) > 1:
            # this rank's queries read the whole sequence's keys and values: one all-gather
            # of both, kv heads only (before any expansion to query heads); the mask holds
            # global positions
            kv = gather_for_cp(torch.cat([xk, xv], dim=2), self.cp_mesh)
            xk, xv = kv.split(self.layout.n_local_kv_heads, dim=2)

        causal, cache_mask = True, None
        if kv_cache is not None:
            cache_k, cache_v = kv_cache
            end = start_pos + seqlen
            cache_k[:bsz, start_pos:end] = xk
            cache_v[:bsz, start_pos:end] = xv
            xk, xv = cache_k[:bsz, :end], cache_v[:bsz, :end]
            if start_pos > 0:
                cache_mask = offset_causal_mask(seqlen, start_pos, x.device)
                causal = False

        q, k, v = (t.transpose(1, 2) for t in (xq, xk, xv))  # (bsz, heads, seqlen, head_dim)
        # one kv head per query head where the heads split unevenly, or where SDPA's fused
        # kernels refuse grouped kv (llama/masks.py); flex attention takes groups as they are
        sdpa_mask = cache_mask if mask is None else mask.dense
        expand = not self.layout.uniform_groups or (
            (mask is None or mask.kernel == "sdpa")
            and self.layout.n_local_kv_heads < self.layout.n_local_heads
            and gqa_needs_expanded_kv(q.dtype, q.device, masked=sdpa_mask is not None)
        )
        if expand:
            index = self.kv_index(k.device)
            k, v = k.index_select(1, index), v.index_select(1, index)
        if mask is not None:
            out = masked_attention(q, k, v, mask, enable_gqa=not expand)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache_mask, is_causal=causal, enable_gqa=not expand)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, tp_mesh: Optional[DeviceMesh] = None, sequence_parallel: bool = False):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.enter = RegionInput(tp_mesh, sequence_parallel)
        self.w1 = ColumnParallelLinear(args.dim, hidden, tp_mesh)
        self.w2 = RowParallelLinear(hidden, args.dim, tp_mesh, sequence_parallel)
        self.w3 = ColumnParallelLinear(args.dim, hidden, tp_mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.enter(x)
        gate, up = shared_input_linears(x, self.w1, self.w3)  # LoRA: one x A^T for both
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, tp_mesh=None, sequence_parallel: bool = False, cp_mesh=None):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, tp_mesh, sequence_parallel, cp_mesh)
        self.feed_forward = FeedForward(args, tp_mesh, sequence_parallel)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, tp_mesh, sequence_parallel)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, tp_mesh, sequence_parallel)

    def forward(
        self, x: torch.Tensor, freqs_cis: FreqsCis, start_pos: int = 0, kv_cache=None,
        mask: Optional[DocumentMask] = None,
    ):
        h = x + self.attention(self.attention_norm(x), freqs_cis, start_pos, kv_cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """`model(tokens)` -> logits: a plain (batch, seq, vocab) tensor without a tp mesh, a
    vocab-sharded DTensor with one (`.full_tensor()` gathers it).
    `model(tokens, start_pos, cache)` runs positions start_pos.. against a KVCache that
    already holds 0..start_pos - 1, and adds theirs to it (inference).
    `model(tokens, document_ids=ids)` runs packed documents (llama/masks.py): each token
    attends only within its document, and RoPE positions restart at each document.
    `attention_kernel` picks that mask's kernel ("sdpa" or "flex"); None chooses by device.
    `model(tokens, ..., last_only=True)` returns the last position's logits only.
    With a `cp_mesh` (context parallelism, parallel/context.py) tokens, document ids and the
    logits are this cp rank's part of the sequence, as `split_for_cp` cuts it.

    Build on the meta device and call `init_weights()` (or `llama.load_model`) to
    allocate only this rank's shards."""

    def __init__(
        self, args: ModelArgs, tp_mesh: Optional[DeviceMesh] = None, sequence_parallel: bool = False,
        cp_mesh: Optional[DeviceMesh] = None,
    ):
        super().__init__()
        tp = tp_size(tp_mesh)
        check_tp_divides_heads(args.n_heads, tp)
        check_vocab(args.vocab_size, tp)
        self.args = args
        self.tp_mesh = tp_mesh
        self.sequence_parallel = sequence_parallel and tp > 1
        self.cp_mesh = cp_mesh if cp_size(cp_mesh) > 1 else None  # None: today's one-sequence path

        self.tok_embeddings = VocabParallelEmbedding(args.vocab_size, args.dim, tp_mesh, self.sequence_parallel)
        self.layers = nn.ModuleList(
            TransformerBlock(i, args, tp_mesh, self.sequence_parallel, self.cp_mesh) for i in range(args.n_layers)
        )
        self.norm = RMSNorm(args.dim, args.norm_eps, tp_mesh, self.sequence_parallel)
        tied = self.tok_embeddings.weight if args.tie_word_embeddings else None
        self.output = VocabParallelOutput(args.dim, args.vocab_size, tp_mesh, self.sequence_parallel, weight=tied)
        self._rope = None  # (cos, sin), built on first use on the tokens' device
        self.attention_kernel: Optional[str] = None

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        cache: Optional[KVCache] = None,
        *,
        document_ids: Optional[torch.Tensor] = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        self.check_tokens(tokens)
        if last_only and self.sequence_parallel:
            raise ValueError("last_only needs the whole sequence on each rank; build the model with sequence_parallel=False")
        if cache is not None or start_pos:
            self.check_cache(cache, tokens, start_pos)
        if self.cp_mesh is not None and (cache is not None or start_pos or last_only):
            raise ValueError(
                "context parallelism (cp_mesh) trains on whole split sequences; KV-cache decoding and "
                "last_only run on a model built without a cp_mesh"
            )
        if document_ids is not None and (cache is not None or start_pos):
            raise ValueError("document_ids are for training on packed rows; KV-cache decoding runs one document")
        if document_ids is not None:
            check_document_ids(document_ids, tokens)
        freqs_cis, mask = self.block_inputs(tokens.shape[1], tokens.device, start_pos, document_ids)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs_cis, start_pos, None if cache is None else (cache.k[i], cache.v[i]), mask)
        if last_only:  # generation needs the next token only: no (prompt x vocab) logits
            h = h[:, -1:]
        return self.output(self.norm(h))

    def block_inputs(self, seqlen: int, device, start_pos: int = 0, document_ids: Optional[torch.Tensor] = None):
        """What every block reads besides the residual stream, built once per forward: the
        RoPE rotation of this rank's `seqlen` positions (freqs_cis), and the attention mask
        (None: SDPA's is_causal)."""
        if self.cp_mesh is not None:
            (cos, sin), mask = self.context_parallel_inputs(seqlen, device, document_ids)
        elif document_ids is None:  # a KV-cache step past the prompt masks by its own offset
            cos, sin = self.rope(seqlen, device, start_pos)
            mask = causal_mask(seqlen, device) if start_pos == 0 else None
        else:
            cos, sin = self.rope_at(document_positions(document_ids))
            mask = document_mask(document_ids, self.attention_kernel)
        return rotation_tables(cos, sin), mask

    def context_parallel_inputs(self, seqlen: int, device, document_ids: Optional[torch.Tensor]):
        """RoPE rows (cos, sin) and the attention mask of this cp rank's `seqlen` tokens, from
        global positions. Per-document positions need the whole sequence's ids: gathered (a
        few bytes per token), numbered, then split again."""
        seq_len = seqlen * cp_size(self.cp_mesh)
        positions = cp_positions(seq_len, self.cp_mesh, device)
        prefixes = cp_key_prefixes(seq_len, self.cp_mesh)
        if document_ids is None:
            mask = context_parallel_mask(positions, seq_len, kernel=self.attention_kernel, key_prefixes=prefixes)
            return self.rope_at(positions), mask
        all_ids = gather_for_cp(document_ids, self.cp_mesh)
        rows = self.rope_at(split_for_cp(document_positions(all_ids), self.cp_mesh))
        return rows, context_parallel_mask(positions, seq_len, all_ids, document_ids, self.attention_kernel, prefixes)

    def rope_table(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of every position up to max_seq_len, built once per device, as Meta
        precomputes freqs_cis once; a forward takes its rows."""
        if self._rope is None or self._rope[0].device != torch.device(device):
            self._rope = rope_table(self.args, self.args.max_seq_len, device)
        return self._rope

    def rope(self, seqlen: int, device, start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope_table(device)
        return cos[start_pos : start_pos + seqlen], sin[start_pos : start_pos + seqlen]

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) rows for a (batch, seq) tensor of positions: (batch, seq, head_dim / 2)."""
        cos, sin = self.rope_table(positions.device)
        return cos[positions], sin[positions]

    def new_kv_cache(self, batch_size: int, max_seq_len: Optional[int] = None) -> KVCache:
        """An empty cache for this rank's kv heads, in the model's dtype and on its device."""
        max_seq_len = max_seq_len or self.args.max_seq_len
        if not 0 < max_seq_len <= self.args.max_seq_len:
            raise ValueError(f"KV cache length {max_seq_len} must be in [1, max_seq_len {self.args.max_seq_len}]")
        like = local_tensor(self.tok_embeddings.weight)
        shape = (batch_size, max_seq_len, self.layers[0].attention.layout.n_local_kv_heads, self.args.head_dim)
        zeros = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(2 * self.args.n_layers)]
        return KVCache(k=zeros[::2], v=zeros[1::2])

    def check_cache(self, cache: Optional[KVCache], tokens: torch.Tensor, start_pos: int) -> None:
        if cache is None:
            raise ValueError(f"start_pos {start_pos} needs a KVCache holding the earlier positions (cache=model.new_kv_cache(...))")
        if self.sequence_parallel:
            raise ValueError("KV cache decoding runs one token at a time; build the model with sequence_parallel=False")
        end = start_pos + tokens.shape[1]
        if start_pos < 0 or end > cache.max_seq_len or tokens.shape[0] > cache.k[0].shape[0]:
            raise ValueError(
                f"positions [{start_pos}, {end}) x batch {tokens.shape[0]} do not fit the KV cache "
                f"(max_seq_len {cache.max_seq_len}, batch {cache.k[0].shape[0]}); allocate a larger one"
            )

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Shape, dtype and length, which the host knows. Not the ids' values: reading them
        would wait for the device in every forward. The data pipeline checks its token
        cache once (train.py) and generation its prompt (llama/generate.py check_request)."""
        if tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be a (batch, seq) integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        seqlen = tokens.shape[1] * cp_size(self.cp_mesh)  # the whole sequence, under context parallelism
        if self.cp_mesh is not None and tokens.shape[1] % 2:
            raise ValueError(
                f"under context parallelism each rank holds two equal chunks of the sequence, got {tokens.shape[1]} "
                "tokens; split the batch with parallel.context.split_for_cp"
            )
        if seqlen > self.args.max_seq_len:
            raise ValueError(
                f"sequence length {seqlen} exceeds max_seq_len {self.args.max_seq_len} (the RoPE table's length); "
                "shorten the input or raise max_seq_len"
            )
        tp = tp_size(self.tp_mesh)
        if self.sequence_parallel and tokens.shape[1] % tp:
            raise ValueError(f"with sequence parallelism the sequence length {tokens.shape[1]} must be divisible by tp {tp}")

    @torch.no_grad()
    def init_weights(self, seed: int = 0, device=None, std: float = 0.02) -> "Transformer":
        """Allocate this rank's shards (when built on meta) and draw them. The values do not
        depend on the mesh: a tp run starts from the same weights as a single device.
        Residual-path projections (wo, w2) get std / sqrt(2 * n_layers)."""
        if device is not None or any(p.is_meta for p in self.parameters()):
            self.to_empty(device=device or "cpu")
        residual_std = std / math.sqrt(2 * self.args.n_layers)
        for name, param in self.named_parameters():
            if is_adapter(name):
                continue
            if name.endswith("norm.weight"):
                local_tensor(param).fill_(1.0)
            else:
                scale = residual_std if name.endswith(("wo.weight", "w2.weight")) else std
                fill_normal_(param, scale, seed, name)
        init_adapters_(self, seed)  # LoRA adapters (llama/lora.py), if any: B = 0, the base unchanged
        return self

    def _apply(self, fn, *args, **kwargs):
        # to_empty / .to() give each module a new parameter, which would untie the output
        super()._apply(fn, *args, **kwargs)
        if self.args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
