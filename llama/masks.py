"""Document masks: several documents packed in one row attend only within themselves.

`document_ids` is a (batch, seq) integer tensor, non-decreasing along each row; equal ids
form one document. A token attends to the earlier tokens of its own document only, and
its RoPE position counts from its document's first token:

    tokens        A0 A1 A2 B0 B1 C0 C1 C2
    document_ids   0  0  0  1  1  2  2  2
    positions      0  1  2  0  1  0  1  2

One mask, two kernels, chosen by device:
  "sdpa"  a dense (batch, 1, seq, seq) boolean block-causal mask for
          F.scaled_dot_product_attention: the CPU path, and the reference.
  "flex"  flex attention with a block mask, which never builds a (seq x seq) mask and
          skips the blocks no query of a document can see: the CUDA path. On CPU flex
          attention runs forward only (inference, and the tests that compare kernels).
"""

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

KERNELS = ("sdpa", "flex")


def default_kernel(device: torch.device) -> str:
    return "flex" if torch.device(device).type == "cuda" else "sdpa"


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) int64: each token's offset from its document's first token."""
    seq = document_ids.shape[1]
    index = torch.arange(seq, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first_of_document = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first_of_document


@dataclass
class DocumentMask:
    """What attention needs to stay inside documents: the dense mask or the block mask."""

    kernel: str
    dense: Optional[torch.Tensor] = None  # (batch, 1, seq, seq) bool, for "sdpa"
    block: Any = None  # flex attention's BlockMask, for "flex"
    # "sdpa": (query rows, keys they can see) per run of queries, so that no query is
    # scored against keys after its run (causal_key_prefixes) or its cp chunk
    key_prefixes: Optional[tuple] = None


# The CPU flash kernel takes keys in blocks of up to 512 and, under is_causal, skips only
# the key blocks wholly past a block of queries: at 512 tokens it computes the whole
# square, and with an explicit mask it always does. Runs of QUERY_RUN queries, each scored
# against the keys up to its last query only, leave out most of the upper triangle:
# (n + 1) / 2n of the square for n runs.
QUERY_RUN = 128


def causal_key_prefixes(seq_len: int, run: Optional[int] = None) -> Optional[tuple]:
    """(query rows, keys they can see) for each run of `run` (default QUERY_RUN) queries of
    a causal sequence of `seq_len`, in host integers; None where one run covers it."""
    run = run or QUERY_RUN
    if seq_len <= run:
        return None
    return tuple((min(run, seq_len - start), min(start + run, seq_len)) for start in range(0, seq_len, run))


def causal_mask(seq_len: int, device) -> Optional[DocumentMask]:
    """Plain causal attention on CPU, as runs of queries against key prefixes (5/8 of the
    square's work at 512 tokens, where SDPA's is_causal does all of it). None, for SDPA's
    is_causal, on GPUs, whose flash kernel skips the upper triangle block by block itself,
    and where one run covers the sequence."""
    if torch.device(device).type != "cpu" or seq_len <= QUERY_RUN:
        return None
    dense = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None]
    return DocumentMask("sdpa", dense=dense, key_prefixes=causal_key_prefixes(seq_len))


def document_mask(document_ids: torch.Tensor, kernel: Optional[str] = None) -> DocumentMask:
    """Built once per forward and shared by every layer."""
    kernel = kernel or default_kernel(document_ids.device)
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {KERNELS}")
    if kernel == "sdpa":
        seq = document_ids.shape[1]
        same_document = document_ids[:, :, None] == document_ids[:, None, :]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
        return DocumentMask(kernel, dense=(same_document & causal).unsqueeze(1), key_prefixes=causal_key_prefixes(seq))

    def same_document_causal(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (q_idx >= kv_idx)

    batch, seq = document_ids.shape
    block = block_mask_builder(document_ids.device)(
        same_document_causal, B=batch, H=None, Q_LEN=seq, KV_LEN=seq, device=document_ids.device
    )
    return DocumentMask(kernel, block=block)


_compiled_create_block_mask = None


def compiles_block_masks(device) -> bool:
    return torch.device(device).type == "cuda"


def block_mask_builder(device):
    """flex attention's create_block_mask, compiled once per process on CUDA, where the
    compiled form evaluates the mask block by block instead of as one (seq x seq) tensor;
    eager elsewhere. (Its `_compile=True` wraps it in a new torch.compile on every call.)
    The mask functions are new closures each forward; dynamo guards on their code and the
    shapes of the tensors they capture, so one graph serves every batch of a shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    global _compiled_create_block_mask
    if not compiles_block_masks(device):
        return create_block_mask
    if _compiled_create_block_mask is None:
        _compiled_create_block_mask = torch.compile(create_block_mask)
    return _compiled_create_block_mask


_compiled_flex = None


def _flex_attention():
    # flex attention is fast only compiled; on CPU the eager form is the (forward-only) reference
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not torch.cuda.is_available():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def gqa_needs_expanded_kv(dtype: torch.dtype, device, masked: bool = False) -> bool:
    """Whether SDPA must be given one kv head per query head to run a fused kernel.

    On CUDA only the flash kernel takes grouped kv heads (enable_gqa), and flash wants
    fp16/bf16, an sm80+ GPU and no explicit mask. Where it refuses, SDPA would fall back to
    the math kernel, which builds (seq x seq) fp32 scores per head; the memory-efficient
    kernel runs instead once kv is expanded, at the cost of a copy of k and v only.
    The CPU flash kernel takes grouped heads, masks and fp32 alike."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if dtype not in (torch.float16, torch.bfloat16) or masked:
        return True
    return torch.cuda.get_device_capability(device) < (8, 0)


def masked_attention(q, k, v, mask: DocumentMask, enable_gqa: bool) -> torch.Tensor:
    """q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim)."""
    if mask.kernel == "sdpa" and mask.key_prefixes is not None:
        outs, start = [], 0
        for rows, keys in mask.key_prefixes:
            end = start + rows
            outs.append(F.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, :keys], v[:, :, :keys], attn_mask=mask.dense[:, :, start:end, :keys],
                enable_gqa=enable_gqa,
            ))
            start = end
        return torch.cat(outs, dim=2)
    if mask.kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=enable_gqa)
    return _flex_attention()(q, k, v, block_mask=mask.block, enable_gqa=enable_gqa)


def check_document_ids(document_ids: torch.Tensor, tokens: torch.Tensor) -> None:
    """Shape and dtype only: checking the values (non-decreasing rows) would read them on
    the host, a device sync in every forward. Our datasets (llama/data/packed.py and
    llama/data/chat_packing.py) number documents 0, 1, 2, ... along each row by construction."""
    if document_ids.shape != tokens.shape or document_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"document_ids must be an integer tensor shaped like tokens {tuple(tokens.shape)}, "
            f"got {tuple(document_ids.shape)} {document_ids.dtype}"
        )


def context_parallel_mask(
    query_positions: torch.Tensor,
    seq_len: int,
    document_ids: Optional[torch.Tensor] = None,
    query_document_ids: Optional[torch.Tensor] = None,
    kernel: Optional[str] = None,
    key_prefixes: Optional[tuple] = None,
) -> DocumentMask:
    """Context parallelism (parallel/context.py): this rank's queries, at global positions
    `query_positions` (local_seq,), against the whole sequence's keys 0..seq_len-1 in order.
    Causal by global position; with documents, also within the query's document:
    `document_ids` (batch, seq_len) of the whole sequence, `query_document_ids` (batch,
    local_seq) of this rank's tokens. `key_prefixes`: (query rows, keys they can see) per
    chunk of queries, for the dense kernel to skip the keys no query of a chunk can see
    (flex skips them by blocks). Built once per forward and shared by every layer."""
    device = query_positions.device
    kernel = kernel or default_kernel(device)
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {KERNELS}")
    if kernel == "sdpa":
        allowed = (query_positions[:, None] >= torch.arange(seq_len, device=device)[None, :])[None]
        if document_ids is not None:
            allowed = allowed & (query_document_ids[:, :, None] == document_ids[:, None, :])
        return DocumentMask(kernel, dense=allowed.unsqueeze(1), key_prefixes=key_prefixes)

    def causal(b, h, q_idx, kv_idx):
        return query_positions[q_idx] >= kv_idx

    def same_document_causal(b, h, q_idx, kv_idx):
        return (query_positions[q_idx] >= kv_idx) & (query_document_ids[b, q_idx] == document_ids[b, kv_idx])

    mask_mod = causal if document_ids is None else same_document_causal
    batch = None if document_ids is None else document_ids.shape[0]
    block = block_mask_builder(device)(
        mask_mod, B=batch, H=None, Q_LEN=query_positions.shape[0], KV_LEN=seq_len, device=device
    )
    return DocumentMask(kernel, block=block)
