"""Shared by the tests/test_convert_*.py files: tiny checkpoints of every kind, written
here independently of the code under test, and the checks the tests make on what
convert_weights.py writes.

Hugging Face checkpoints are written with safetensors' own writer and q/k in HF's layout
(the documented permutation of Meta-layout weights), Meta ones with torch.save, split over
2 ranks and (kv heads duplicated) over 4, a training checkpoint with torch.distributed.checkpoint.
Tolerances: conversions are exact (torch.equal, bytes); logits fp32, 1e-5 absolute
against Meta's reference model."""

import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import convert_weights
from llama import ModelArgs
from llama.weights.names import expected_shapes

TOL = 1e-5
REPO = Path(__file__).resolve().parent.parent
# GQA 4 query heads over 2 kv heads; RoPE scaling with the values Meta's reference
# hard-codes (factor 8, low 1, high 4, context 8192). FFN width 192 from multiple_of 32.
ARGS = ModelArgs(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, rope_theta=500000.0,
    use_scaled_rope=True, rope_scale_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
    rope_original_context=8192, max_seq_len=32,
)
TIED = ModelArgs(**{**ARGS.to_dict(), "tie_word_embeddings": True})
ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        "rope_type": "llama3"}

# ---------------------------------------------------------------- fixtures, written without convert_weights

HF_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}


def hf_name(name):
    if name in HF_TOP:
        return HF_TOP[name]
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{HF_LAYER[rest]}"


def to_hf_layout(w, n):
    """The documented permutation: Meta's interleaved RoPE pairs -> HF's halves."""
    d1, d2 = w.shape
    return w.view(n, d1 // n // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def meta_weights(args, seed, dtype=torch.float32):
    """Random weights in Meta names and layout, in the model's order."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in expected_shapes(args).items():
        w = torch.randn(shape, generator=gen) * (0.1 if name.endswith("norm.weight") else 0.2)
        weights[name] = (w + 1 if name.endswith("norm.weight") else w).to(dtype)
    return weights


def hf_tensors(args, weights):
    out = {}
    for name, w in weights.items():
        if name.endswith("wq.weight"):
            w = to_hf_layout(w, args.n_heads)
        elif name.endswith("wk.weight"):
            w = to_hf_layout(w, args.n_kv_heads)
        out[hf_name(name)] = w.contiguous()
    return out


def write_hf(path, args, weights, dtype_name, shards, rope_key="rope_scaling"):
    """`shards`: file name -> predicate on the HF name. Writes config.json (+ index when
    there are several files) the way the hub does."""
    path.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu", "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "max_position_embeddings": args.max_seq_len, "model_type": "llama", "num_attention_heads": args.n_heads,
        "num_hidden_layers": args.n_layers, "num_key_value_heads": args.n_kv_heads, "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": args.tie_word_embeddings, "torch_dtype": dtype_name, "vocab_size": args.vocab_size,
    }
    if rope_key == "rope_scaling":
        config.update(rope_theta=args.rope_theta, rope_scaling=ROPE)
    else:
        config["rope_parameters"] = {"rope_theta": args.rope_theta, **ROPE}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = hf_tensors(args, weights)
    weight_map = {}
    for file, wanted in shards.items():
        part = {k: v for k, v in tensors.items() if wanted(k)}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    assert set(weight_map) == set(tensors)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_meta(path, args, weights, n_ranks, params_extra):
    """Meta's layout: one consolidated.NN.pth per model-parallel rank. With more ranks than
    kv heads each rank holds the kv head its query heads read, so kv heads repeat."""
    path.mkdir(parents=True)
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": args.multiple_of, "ffn_dim_multiplier": None,
              "norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "use_scaled_rope": True, "max_seq_len": 32,
              "rope_scale_factor": 8.0, **params_extra}
    (path / "params.json").write_text(json.dumps(params))
    ranks = [{} for _ in range(n_ranks)]
    for name, w in weights.items():
        if name.endswith("norm.weight"):
            pieces = [w] * n_ranks
        elif name.endswith(("wk.weight", "wv.weight")) and n_ranks > args.n_kv_heads:
            heads = w.view(args.n_kv_heads, args.head_dim, args.dim)
            pieces = [heads[r * args.n_kv_heads // n_ranks] for r in range(n_ranks)]
        else:
            pieces = w.chunk(n_ranks, dim=1 if name.endswith(("wo.weight", "w2.weight")) else 0)
        for rank, piece in zip(ranks, pieces):
            rank[name] = piece.clone()
    for r, state in enumerate(ranks):
        torch.save(state, path / f"consolidated.{r:02d}.pth")


class Fixtures:
    def __init__(self, root: Path):
        self.root = root
        # untied fp32, 3 shards + index, "rope_scaling"
        self.hf_weights = meta_weights(ARGS, seed=1)
        self.hf = root / "hf"
        write_hf(self.hf, ARGS, self.hf_weights, "float32", {
            "model-00001-of-00003.safetensors": lambda k: "embed" in k or ".layers.0." in k,
            "model-00002-of-00003.safetensors": lambda k: ".layers.1." in k,
            "model-00003-of-00003.safetensors": lambda k: k in ("model.norm.weight", "lm_head.weight"),
        })
        # tied bf16, one file without an index, "rope_parameters"
        self.tied_weights = meta_weights(TIED, seed=2, dtype=torch.bfloat16)
        self.hf_tied = root / "hf_tied"
        write_hf(self.hf_tied, TIED, self.tied_weights, "bfloat16", {"model.safetensors": lambda k: True},
                 rope_key="rope_parameters")
        # Meta, 2 ranks, untied
        self.meta_weights = meta_weights(ARGS, seed=3)
        self.meta2 = root / "meta2"
        write_meta(self.meta2, ARGS, self.meta_weights, 2, {"tie_word_embeddings": False})
        # Meta, 4 ranks over 2 kv heads (each kv head twice); params.json does not say whether
        # the output is tied, and output.weight is stored equal to tok_embeddings: tied
        self.meta4_weights = meta_weights(TIED, seed=4)
        self.meta4 = root / "meta4"
        stored = {**self.meta4_weights, "output.weight": self.meta4_weights["tok_embeddings.weight"]}
        write_meta(self.meta4, TIED, stored, 4, {})
        # a training checkpoint as train.py writes it: DCP, model tensors under "model.",
        # optimizer state beside them; model_args.json one level up
        self.dcp = root / "run" / "step-10"
        write_dcp(self.dcp, ARGS, self.meta_weights)


def write_dcp(path, args, weights):
    import torch.distributed.checkpoint as dcp

    path.mkdir(parents=True)
    state = {"model": dict(weights), "optim": {"step": torch.tensor(10.0)}}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    meta = {"format": "llama-tp-safetensors/1", "model_args": args.to_dict()}
    (path.parent / "model_args.json").write_text(json.dumps(meta))



# ---------------------------------------------------------------- running the converter, checking its output


def convert(*argv) -> int:
    return convert_weights.main([str(a) for a in argv] + ["--quiet"])


def read_all(path: Path) -> dict:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def ffn_as_width(args: ModelArgs) -> ModelArgs:
    """HF stores the FFN width, Meta the recipe that yields it: compare the width."""
    return replace(args, ffn_hidden_size=args.ffn_hidden_dim, multiple_of=256, ffn_dim_multiplier=None)


def assert_same_tensors(got: dict, want: dict):
    assert list(sorted(got)) == list(sorted(want))
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


def assert_failed_cleanly(capsys, out: Path, code: int, words):
    err = capsys.readouterr().err
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists() and not out.parent.exists()  # nothing left, not even the directory made for OUT

