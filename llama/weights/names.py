"""The names a checkpoint stores its tensors under, and the one layout change between kinds.

Ours are the model's parameter names (Meta's), in the model's order; Hugging Face's
differ by a table; HF's q/k rows are Meta's reordered for its RoPE (the permutation
below). Every reader and writer of llama/weights/ speaks our names and Meta's layout.
"""

import re
from typing import Optional

import torch

from ..config import ModelArgs
from ..lora import is_adapter
from ..model import Transformer

# ---------------------------------------------------------------- Hugging Face names and RoPE layout

HF_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Derived tables some exports store; the model computes them itself.
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
META_IGNORED = {"rope.freqs"}


def to_hf_name(name: str) -> str:
    if name in HF_TOP_NAMES:
        return HF_TOP_NAMES[name]
    layer, _, rest = name.removeprefix("layers.").partition(".")
    return f"model.layers.{layer}.{HF_LAYER_NAMES[rest]}"


def from_hf_name(hf: str) -> Optional[str]:
    for ours, theirs in HF_TOP_NAMES.items():
        if hf == theirs:
            return ours
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    for ours, theirs in HF_LAYER_NAMES.items():
        if match and match.group(2) == theirs:
            return f"layers.{match.group(1)}.{ours}"
    return None


def rope_heads(name: str, args: ModelArgs) -> Optional[int]:
    """Number of heads whose rows q/k weights permute between the layouts; None for others."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


# Meta's RoPE rotates interleaved pairs (x0, x1), (x2, x3)... of each head; HF's rotates
# the two halves. HF's q/k rows are Meta's reordered inside each head to match.
def hf_to_meta_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def meta_to_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


# ---------------------------------------------------------------- our names: the model's parameters


def expected_tensors(model: Transformer) -> dict:
    """Checkpoint name -> parameter of the base model; a tied output shares tok_embeddings
    and is not stored, and LoRA adapters (llama/lora.py) are not the base's."""
    return {name: param for name, param in model.named_parameters() if not is_adapter(name)}


def expected_shapes(args: ModelArgs) -> dict:
    """Checkpoint name -> global shape, in the model's order; nothing is allocated."""
    with torch.device("meta"):
        model = Transformer(args)
    return {name: tuple(p.shape) for name, p in expected_tensors(model).items()}
