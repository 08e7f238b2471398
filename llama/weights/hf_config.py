"""config.json out: our model args as Hugging Face's LlamaForCausalLM config, and the
check that what is written reads back as the same model."""

import json
from dataclasses import replace
from pathlib import Path

import torch

from ..config import ModelArgs
from .source import Source

HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
LLAMA3_BOS, LLAMA3_EOS = 128000, 128001  # Llama 3's <|begin_of_text|> and <|end_of_text|>


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype, bos, eos) -> dict:
    rope = None
    if args.use_scaled_rope:
        rope = {
            "factor": args.rope_scale_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "original_max_position_embeddings": args.rope_original_context,
            "rope_type": "llama3",
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": LLAMA3_BOS if bos is None else bos,
        "eos_token_id": LLAMA3_EOS if eos is None else eos,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "hidden_size": args.dim,
        "initializer_range": 0.02,
        "intermediate_size": args.ffn_hidden_dim,
        "max_position_embeddings": args.max_seq_len,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": args.n_heads,
        "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.n_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": args.norm_eps,
        "rope_scaling": rope,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_word_embeddings,
        "torch_dtype": HF_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")),
        "use_cache": True,
        "vocab_size": args.vocab_size,
    }


def write_hf_config(source: Source, out_dir: Path, dtype: torch.dtype, bos, eos) -> None:
    """The source's own config.json when it still describes the model (it keeps keys we do
    not model, e.g. a list of eos ids), with dtype and ids updated; else one generated
    from the model args. Either is checked by reading it back."""
    file = out_dir / "config.json"
    original = (source.hf or {}).get("config")
    if original:
        config = dict(original)
        dtype_key = "dtype" if "dtype" in config else "torch_dtype"  # transformers >= 4.56 writes "dtype"
        config[dtype_key] = HF_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
        if bos is not None:
            config["bos_token_id"] = bos
        if eos is not None:
            config["eos_token_id"] = eos
        file.write_text(json.dumps(config, indent=2) + "\n")
        try:
            if same_model(ModelArgs.from_hf_config(file), source.args):
                return
        except ValueError:
            pass  # not a config we can still use: generate one
    file.write_text(json.dumps(hf_config_from_args(source.args, dtype, bos, eos), indent=2) + "\n")
    if not same_model(ModelArgs.from_hf_config(file), source.args):
        raise RuntimeError(f"{file}: does not read back as the model args it was written from")


def same_model(a: ModelArgs, b: ModelArgs) -> bool:
    """Equal up to how the FFN width is spelled (HF stores it, Meta derives it)."""
    def canonical(args):
        return replace(args, ffn_hidden_size=args.ffn_hidden_dim, multiple_of=256, ffn_dim_multiplier=None)

    return canonical(a) == canonical(b)
