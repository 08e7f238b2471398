"""Model hyperparameters: one dataclass, named presets, and readers for the
two config formats users arrive with (Hugging Face config.json, Meta params.json)."""

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1 frequency scaling; every number comes from the checkpoint's config
    # because 3.2 uses factor 32 where Meta's reference code hard-codes 8
    # (meta_rope_scale_factor: for a params.json that does not say).
    use_scaled_rope: bool = False
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    max_seq_len: int = 8192
    tie_word_embeddings: bool = False
    ffn_hidden_size: Optional[int] = None  # explicit FFN width; overrides the recipe above

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        checks = [
            (self.dim % self.n_heads == 0, f"dim {self.dim} must be divisible by n_heads {self.n_heads}"),
            (
                self.n_heads % self.n_kv_heads == 0,
                f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}",
            ),
            ((self.dim // self.n_heads) % 2 == 0, f"head_dim {self.dim // self.n_heads} must be even for RoPE"),
            (self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}"),
            (self.max_seq_len > 0, f"max_seq_len must be positive, got {self.max_seq_len}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ModelArgs: {message}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        hidden = int(8 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def num_params(self, include_embedding: bool = True) -> int:
        """Exact parameter count, as published (tied output counted once)."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = self.dim * (2 * self.dim + 2 * kv_dim)
        mlp = 3 * self.dim * self.ffn_hidden_dim
        block = attention + mlp + 2 * self.dim
        embedding = self.vocab_size * self.dim
        output = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        total = self.n_layers * block + self.dim + output
        return total + (embedding if include_embedding else 0)

    def training_flops_per_token(self, seq_len: int) -> int:
        """6 * (params - embedding params) + 12 * layers * heads * head_dim * seq_len."""
        dense = self.num_params(include_embedding=False)
        if self.tie_word_embeddings:
            # the tied matrix still does the output projection's matmul
            dense += self.vocab_size * self.dim
        return 6 * dense + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "dict") -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ModelArgs keys {unknown}; valid keys are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf_config(cls, path) -> "ModelArgs":
        """Read a Hugging Face `config.json` (or the directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        cfg = _read_json(path)
        try:
            rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
            theta = cfg.get("rope_theta", rope.get("rope_theta", 500000.0))
            scaled = rope.get("rope_type", rope.get("type")) == "llama3"
            args = dict(
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                vocab_size=cfg["vocab_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-5),
                rope_theta=float(theta),
                max_seq_len=cfg.get("max_position_embeddings", 8192),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                use_scaled_rope=scaled,
            )
            if scaled:
                args.update(
                    rope_scale_factor=float(rope["factor"]),
                    rope_low_freq_factor=float(rope["low_freq_factor"]),
                    rope_high_freq_factor=float(rope["high_freq_factor"]),
                    rope_original_context=int(rope["original_max_position_embeddings"]),
                )
        except KeyError as missing:
            raise ValueError(f"{path}: missing key {missing} in Hugging Face config") from None
        if cfg.get("head_dim") not in (None, cfg["hidden_size"] // cfg["num_attention_heads"]):
            raise ValueError(f"{path}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads; not a Llama 3 config")
        # HF stores the FFN width itself rather than Meta's (multiplier, multiple_of) recipe
        return cls(**args, ffn_hidden_size=cfg.get("intermediate_size"))

    @classmethod
    def from_meta_params(
        cls, path, tie_word_embeddings: Optional[bool] = None, rope_scale_factor: Optional[float] = None
    ) -> "ModelArgs":
        """Read Meta's `params.json` (or the directory holding it). Two things it may not
        say, and the values given here win over it:
          - whether the output layer is tied to the embeddings: the checkpoint's tensors
            tell (llama.weights.meta.meta_source looks and passes the answer); from params.json
            alone, only the published Llama 3.2 shapes are taken as tied;
          - the RoPE scale factor, when use_scaled_rope: see meta_rope_scale_factor."""
        path = Path(path)
        if path.is_dir():
            path = path / "params.json"
        p = _read_json(path)
        try:
            args = dict(
                dim=p["dim"],
                n_layers=p["n_layers"],
                n_heads=p["n_heads"],
                n_kv_heads=p.get("n_kv_heads"),
                vocab_size=p["vocab_size"],
                multiple_of=p.get("multiple_of", 256),
                ffn_dim_multiplier=p.get("ffn_dim_multiplier"),
                norm_eps=p.get("norm_eps", 1e-5),
                rope_theta=float(p.get("rope_theta", 10000.0)),
                use_scaled_rope=bool(p.get("use_scaled_rope", False)),
            )
        except KeyError as missing:
            raise ValueError(f"{path}: missing key {missing} in Meta params.json") from None
        args["max_seq_len"] = int(p.get("max_seq_len", 131072 if args["use_scaled_rope"] else 8192))
        if tie_word_embeddings is None:
            tie_word_embeddings = p.get("tie_word_embeddings")
        if tie_word_embeddings is None:
            tie_word_embeddings = llama32_shape(cls(**args, tie_word_embeddings=True)) is not None
        args["tie_word_embeddings"] = bool(tie_word_embeddings)
        if args["use_scaled_rope"]:
            if rope_scale_factor is None:
                rope_scale_factor = p.get("rope_scale_factor")
            if rope_scale_factor is None:
                rope_scale_factor, _ = meta_rope_scale_factor(cls(**args))
            args["rope_scale_factor"] = float(rope_scale_factor)
        return cls(**args)


def llama32_shape(args: ModelArgs) -> Optional[str]:
    """The preset ("3.2-1b" or "3.2-3b") whose shapes these are, tied output included; else None."""
    def shape(a: ModelArgs) -> tuple:
        return a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.ffn_hidden_dim, a.tie_word_embeddings

    return next((name for name in ("3.2-1b", "3.2-3b") if shape(PRESETS[name]) == shape(args)), None)


def meta_rope_scale_factor(args: ModelArgs) -> tuple:
    """(factor, why) for a Meta checkpoint whose params.json says use_scaled_rope but not the
    factor. Meta's reference code hard-codes 8, right for Llama 3.1 and any model trained
    with that code; the Llama 3.2 1B and 3B were trained with 32."""
    name = llama32_shape(args)
    if name is not None:
        return 32.0, f"the Llama {name} shape"
    return 8.0, "not a Llama 3.2 shape"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read config: {err}") from None


_LLAMA31 = dict(rope_theta=500000.0, use_scaled_rope=True, rope_scale_factor=8.0, max_seq_len=131072)
_LLAMA32 = dict(
    rope_theta=500000.0, use_scaled_rope=True, rope_scale_factor=32.0, max_seq_len=131072, tie_word_embeddings=True
)

PRESETS = {
    # Small enough to train on two CPU cores; the byte tokenizer's ids fit in its vocabulary.
    "debug": ModelArgs(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=512,
        multiple_of=64,
        rope_theta=500000.0,
        use_scaled_rope=True,
        rope_scale_factor=8.0,
        rope_original_context=256,
        max_seq_len=1024,
    ),
    "3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256, **_LLAMA32),
    "3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0, multiple_of=256, **_LLAMA32),
    "3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024, **_LLAMA31),
    "3.1-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096, **_LLAMA31),
    "3.1-405b": ModelArgs(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2, multiple_of=4096, **_LLAMA31
    ),
}
