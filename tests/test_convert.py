"""convert_weights.py: Hugging Face and Meta checkpoints in, the project's format out, and
back to Hugging Face.

The fixtures are tiny checkpoints written here, independently of the code under test:
Hugging Face ones with safetensors' own writer and q/k in HF's layout (the documented
permutation of Meta-layout weights), Meta ones with torch.save, split over 2 ranks and
(kv heads duplicated) over 4. Tolerances: conversions are exact (torch.equal, bytes);
logits fp32, 1e-5 absolute against Meta's reference model."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert_weights
import llama.config
import llama.weights.meta
from llama import ModelArgs
from llama.config import meta_rope_scale_factor
from llama.weights.format import read_model_args
from llama.weights.kinds import open_source
from llama.weights.names import expected_shapes
from llama.weights.source import check_source
from parallel.spawn import run_on_ranks

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


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return Fixtures(tmp_path_factory.mktemp("sources"))


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


# ---------------------------------------------------------------- Hugging Face


def test_hf_to_ours_holds_meta_names_and_layout(fx, tmp_path):
    assert convert(fx.hf, tmp_path / "ours") == 0
    assert_same_tensors(read_all(tmp_path / "ours"), fx.hf_weights)
    # the args the fixture's config.json was written from, not the reader the converter calls
    assert ffn_as_width(read_model_args(tmp_path / "ours")) == ffn_as_width(ARGS)
    # the source's shard layout is kept: same file names, index in our names
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["tok_embeddings.weight"] == "model-00001-of-00003.safetensors"
    assert index["weight_map"]["output.weight"] == "model-00003-of-00003.safetensors"


def assert_bit_exact_copy(src: Path, out: Path):
    """Same files, same bytes; config.json the same JSON."""
    names = sorted(p.name for p in src.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if name == "config.json":
            assert json.loads((out / name).read_text()) == json.loads((src / name).read_text())
        else:
            assert (out / name).read_bytes() == (src / name).read_bytes(), name
    for file in src.glob("*.safetensors"):  # and tensor by tensor, for a readable failure
        with safe_open(str(file), "pt") as a, safe_open(str(out / file.name), "pt") as b:
            assert a.metadata() == b.metadata() and list(a.keys()) == list(b.keys())


@pytest.mark.parametrize("which", ["hf", "hf_tied"])
def test_hf_to_ours_to_hf_is_bit_exact(fx, tmp_path, which):
    src = getattr(fx, which)
    assert convert(src, tmp_path / "ours") == 0
    assert convert("--to-hf", tmp_path / "ours", tmp_path / "back") == 0
    assert_bit_exact_copy(src, tmp_path / "back")


def test_round_trip_through_a_resharded_checkpoint_keeps_every_tensor(fx, tmp_path):
    """Re-sharding takes the tensor-by-tensor path (not whole-file copies): still every HF
    tensor comes back with its name, dtype, shape and bytes."""
    assert convert(fx.hf, tmp_path / "ours", "--max-shard-size", "30KB") == 0
    assert len(list((tmp_path / "ours").glob("*.safetensors"))) > 3
    assert convert("--to-hf", tmp_path / "ours", tmp_path / "back") == 0
    assert_same_tensors(read_all(tmp_path / "back"), read_all(fx.hf))


def test_tied_hf_checkpoint_stores_no_output(fx, tmp_path):
    assert convert(fx.hf_tied, tmp_path / "ours") == 0
    tensors = read_all(tmp_path / "ours")
    assert "output.weight" not in tensors and read_model_args(tmp_path / "ours").tie_word_embeddings
    assert_same_tensors(tensors, fx.tied_weights)


def test_dtype_option_casts_every_tensor(fx, tmp_path):
    assert convert(fx.hf, tmp_path / "ours", "--dtype", "bf16") == 0
    assert_same_tensors(read_all(tmp_path / "ours"), {k: v.to(torch.bfloat16) for k, v in fx.hf_weights.items()})


def test_max_shard_size_splits_output_with_an_index(fx, tmp_path):
    out = tmp_path / "ours"
    assert convert(fx.meta2, out, "--max-shard-size", "40KB") == 0
    files = sorted(out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(files) > 3 and {f.name for f in files} == set(index["weight_map"].values())
    assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    largest = max(t.numel() * 4 for t in fx.meta_weights.values())
    assert all(f.stat().st_size <= max(40_000, largest) + 4096 for f in files)  # + header
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in fx.meta_weights.values())
    assert_same_tensors(read_all(out), fx.meta_weights)


# ---------------------------------------------------------------- Meta


def test_meta_shards_merge_along_the_documented_dims(fx, tmp_path):
    assert convert(fx.meta2, tmp_path / "ours") == 0
    assert_same_tensors(read_all(tmp_path / "ours"), fx.meta_weights)
    assert read_model_args(tmp_path / "ours") == ARGS  # what params.json was written from


def test_meta_kv_heads_repeated_over_ranks_are_deduplicated(fx, tmp_path):
    assert convert(fx.meta4, tmp_path / "ours") == 0
    tensors = read_all(tmp_path / "ours")
    assert tensors["layers.0.attention.wk.weight"].shape == (TIED.n_kv_heads * TIED.head_dim, TIED.dim)
    assert "output.weight" not in tensors  # tied: the stored copy equals tok_embeddings and is dropped
    assert_same_tensors(tensors, fx.meta4_weights)


def test_meta_to_hf_writes_the_hub_layout_and_config(fx, tmp_path):
    out = tmp_path / "hf"
    assert convert("--to-hf", fx.meta2, out, "--max-shard-size", "100KB", "--eos-id", "128001,128009") == 0
    assert_same_tensors(read_all(out), hf_tensors(ARGS, fx.meta_weights))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf_tensors(ARGS, fx.meta_weights))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["rope_scaling"] == ROPE and config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (128000, [128001, 128009])
    assert config["intermediate_size"] == 192 and config["tie_word_embeddings"] is False
    # what transformers would read back is the same model
    assert convert_weights.same_model(ModelArgs.from_hf_config(out), ARGS)


def test_default_token_ids_and_dtype_in_generated_config(fx, tmp_path):
    out = tmp_path / "hf"
    assert convert("--to-hf", fx.meta4, out, "--dtype", "bf16") == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (128000, 128001, "bfloat16")
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in read_all(out)


def test_training_checkpoint_dcp_to_hf(fx, tmp_path):
    """A DCP directory (model tensors under "model.", model_args.json one level up) exports
    like a converted checkpoint, cast on the way."""
    assert convert("--to-hf", fx.dcp, tmp_path / "hf", "--dtype", "bf16") == 0
    want = {k: v.to(torch.bfloat16) for k, v in hf_tensors(ARGS, fx.meta_weights).items()}
    assert_same_tensors(read_all(tmp_path / "hf"), want)


# ---------------------------------------------------------------- Meta: what params.json does not say


def write_meta_as_published(path, args, weights, n_ranks):
    """Like Meta's own params.json: neither tie_word_embeddings nor rope_scale_factor."""
    write_meta(path, args, weights, n_ranks, {})
    params = json.loads((path / "params.json").read_text())
    del params["rope_scale_factor"]
    (path / "params.json").write_text(json.dumps(params))


def convert_saying(capsys, *argv) -> tuple:
    """(exit code, the converter's "convert: " lines), run without --quiet."""
    code = convert_weights.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("convert: ")]


UNSAID = "convert: params.json does not say whether the output is tied; "
FACTOR_8 = "convert: rope scale factor 8 (not a Llama 3.2 shape; --rope-scale-factor overrides)"


def _logits_worker(path, args, weights, tokens):
    from llama import load_model
    from tests.reference import meta_reference_model

    with torch.inference_mode():
        reference = meta_reference_model(args, weights, max_batch_size=tokens.shape[0]).forward(tokens, 0)
        return (load_model(path)(tokens) - reference).abs().max().item()


def test_small_untied_meta_model_converts_untied_and_keeps_its_logits(tmp_path, capsys):
    """dim 64 with scaled RoPE and a distinct output.weight: untied, factor 8, and the
    converted model computes Meta's reference logits on the original weights."""
    weights = meta_weights(ARGS, seed=6)
    write_meta_as_published(tmp_path / "meta", ARGS, weights, 2)
    code, said = convert_saying(capsys, tmp_path / "meta", tmp_path / "ours")
    assert code == 0
    assert said == [UNSAID + "output.weight differs from tok_embeddings.weight in consolidated.*.pth: untied", FACTOR_8]
    assert read_model_args(tmp_path / "ours") == ARGS
    assert_same_tensors(read_all(tmp_path / "ours"), weights)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 16), generator=torch.Generator().manual_seed(8))
    assert run_on_ranks(_logits_worker, 1, str(tmp_path / "ours"), ARGS, weights, tokens)[0] <= TOL


def test_meta_checkpoint_without_output_weight_converts_tied(tmp_path, capsys):
    weights = meta_weights(TIED, seed=7)
    write_meta_as_published(tmp_path / "meta", TIED, weights, 2)
    code, said = convert_saying(capsys, tmp_path / "meta", tmp_path / "ours")
    assert code == 0
    assert said == [UNSAID + "no output.weight in consolidated.00.pth: tied", FACTOR_8]
    assert read_model_args(tmp_path / "ours") == TIED
    assert_same_tensors(read_all(tmp_path / "ours"), weights)


def test_meta_output_weight_equal_to_embeddings_converts_tied(fx, tmp_path, capsys):
    code, said = convert_saying(capsys, fx.meta4, tmp_path / "ours")  # its params.json gives factor 8
    assert code == 0
    assert said == [UNSAID + "output.weight equals tok_embeddings.weight in consolidated.*.pth: tied"]
    assert read_model_args(tmp_path / "ours") == TIED
    assert_same_tensors(read_all(tmp_path / "ours"), fx.meta4_weights)


def test_telling_tied_from_untied_streams_rank_pieces_band_by_band(fx, tmp_path, monkeypatch):
    """No merged copy of output or embeddings is made to decide, and a distinct output is
    told apart by its first band: one comparison, whatever the matrix's size."""
    merged, compared = [], []
    real_merged, real_equal = llama.weights.meta._merged, torch.equal
    monkeypatch.setattr(llama.weights.meta, "_merged", lambda pieces, files, name, *rest: merged.append(name)
                        or real_merged(pieces, files, name, *rest))
    monkeypatch.setattr(torch, "equal", lambda a, b: compared.append(tuple(a.shape)) or real_equal(a, b))
    monkeypatch.setattr(llama.weights.meta, "COMPARE_BAND_BYTES", 8 * ARGS.dim * 4)  # 8 rows of fp32
    untied = tmp_path / "untied"
    write_meta_as_published(untied, ARGS, meta_weights(ARGS, seed=6), 2)
    for path, tied, comparisons in [(fx.meta4, True, 4 * (ARGS.vocab_size // 4) // 8), (untied, False, 1)]:
        merged.clear(), compared.clear()
        source = open_source(path)
        check_source(source)
        assert source.args.tie_word_embeddings is tied
        assert merged == [] and len(compared) == comparisons and set(compared) == {(8, ARGS.dim)}, path


@pytest.mark.parametrize("preset, tied, factor", [
    ("3.2-1b", True, 32.0), ("3.2-3b", True, 32.0),
    ("3.2-1b", False, 8.0),  # the 1B's shapes with a separate output layer: not a Llama 3.2
    ("3.1-8b", False, 8.0), ("debug", True, 8.0),
])
def test_rope_scale_factor_32_only_for_the_llama_32_shapes(tmp_path, preset, tied, factor):
    args = ModelArgs.from_preset(preset, tie_word_embeddings=tied)
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
              "ffn_dim_multiplier": args.ffn_dim_multiplier, "norm_eps": 1e-5, "rope_theta": 500000.0,
              "use_scaled_rope": True}
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert ModelArgs.from_meta_params(tmp_path, tie_word_embeddings=tied).rope_scale_factor == factor
    assert meta_rope_scale_factor(args)[0] == factor
    other = {**params, "n_layers": args.n_layers + 1}  # one layer more: a custom model, the factor of the code
    (tmp_path / "params.json").write_text(json.dumps(other))
    assert ModelArgs.from_meta_params(tmp_path, tie_word_embeddings=tied).rope_scale_factor == 8.0


def test_converter_applies_the_llama_32_factor_to_a_llama_32_shape(tmp_path, capsys, monkeypatch):
    """Through the converter: a tied checkpoint of the 3.2-1b preset's shapes (the preset
    shrunk to TIED's for the test; a real 1B is 2.5 GB) gets factor 32, and says why."""
    monkeypatch.setitem(llama.config.PRESETS, "3.2-1b", TIED)
    write_meta_as_published(tmp_path / "meta", TIED, meta_weights(TIED, seed=7), 2)
    code, said = convert_saying(capsys, tmp_path / "meta", tmp_path / "ours")
    assert code == 0
    assert said == [UNSAID + "no output.weight in consolidated.00.pth: tied",
                    "convert: rope scale factor 32 (the Llama 3.2-1b shape; --rope-scale-factor overrides)"]
    assert read_model_args(tmp_path / "ours") == replace(TIED, rope_scale_factor=32.0)


def test_tie_and_rope_flags_override_params_json_and_the_tensors(fx, tmp_path, capsys):
    # the stored output equals the embeddings, yet kept as a separate matrix when asked
    code, said = convert_saying(capsys, fx.meta4, tmp_path / "untied", "--no-tie-word-embeddings")
    assert code == 0 and said == ["convert: output not tied to the embeddings (--no-tie-word-embeddings)"]
    assert read_model_args(tmp_path / "untied") == ARGS
    assert torch.equal(read_all(tmp_path / "untied")["output.weight"], fx.meta4_weights["tok_embeddings.weight"])
    # params.json of meta2 says factor 8 and untied
    code, said = convert_saying(capsys, fx.meta2, tmp_path / "f16", "--rope-scale-factor", "16")
    assert code == 0 and said == ["convert: rope scale factor 16 (--rope-scale-factor)"]
    assert read_model_args(tmp_path / "f16") == replace(ARGS, rope_scale_factor=16.0)


@pytest.mark.parametrize("src, argv, words", [
    ("meta2", ["--tie-word-embeddings"],  # its output.weight is a matrix of its own
     ["consolidated.*.pth", "output.weight differs from tok_embeddings.weight", "--tie-word-embeddings"]),
    ("meta2", ["--rope-scale-factor", "-2"], ["--rope-scale-factor", "-2", "positive"]),
    ("hf", ["--rope-scale-factor", "16"], ["--rope-scale-factor", "only for a Meta checkpoint", "config.json"]),
    ("hf", ["--no-tie-word-embeddings"], ["--no-tie-word-embeddings", "only for a Meta checkpoint"]),
    ("meta without output.weight", ["--no-tie-word-embeddings"],
     ["consolidated.00.pth", "no output.weight", "--no-tie-word-embeddings"]),
    ("meta without RoPE scaling", ["--rope-scale-factor", "16"], ["--rope-scale-factor", "use_scaled_rope false"]),
])
def test_tie_and_rope_flags_refuse_what_they_cannot_mean(fx, tmp_path, capsys, src, argv, words):
    if src == "meta without output.weight":
        src = tmp_path / "src"
        write_meta_as_published(src, TIED, meta_weights(TIED, seed=7), 2)
    elif src == "meta without RoPE scaling":
        src = tmp_path / "src"
        write_meta(src, ARGS, fx.meta_weights, 1, {"use_scaled_rope": False})
    else:
        src = getattr(fx, src)
    out = tmp_path / "out" / "ckpt"
    assert_failed_cleanly(capsys, out, convert(src, out, *argv), words)


# ---------------------------------------------------------------- loading on any mesh


def _load_worker(cases, tokens):
    """Meta's reference vs load_model without a mesh, at tp 2 (a (2, 2) mesh's tp dim) and
    tp 4, for each converted checkpoint; plus the bytes each rank reads at tp 4."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import llama.weights.safetensors_io as safetensors_io
    from llama import load_model
    from parallel.layers import local_tensor
    from tests.reference import meta_reference_model

    world = dist.get_world_size()
    meshes = {2: init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))["tp"],
              4: init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))}
    results = {}
    for name, (path, args, weights) in cases.items():
        with torch.inference_mode():
            reference = meta_reference_model(args, weights, max_batch_size=tokens.shape[0]).forward(tokens, 0)
        with torch.no_grad():
            diffs = {"tp1": (load_model(path)(tokens) - reference).abs().max().item()}
            for tp, mesh in meshes.items():
                diffs[f"tp{tp}"] = (load_model(path, tp_mesh=mesh)(tokens).full_tensor() - reference).abs().max().item()
        results[name] = diffs

    reads, real_preadv = [], os.preadv
    def counting_preadv(fd, buffers, offset):
        n = real_preadv(fd, buffers, offset)
        reads.append(n)
        return n

    # per run: exactly the shard, one read per row of a column shard; in bands (the
    # default): a column shard's whole rows from its first run to its last, in one read
    results["bytes"] = {}
    for mode, max_hole in (("per run", 0), ("bands", safetensors_io.MAX_HOLE_BYTES)):
        reads.clear()
        safetensors_io.os.preadv, saved = counting_preadv, safetensors_io.MAX_HOLE_BYTES
        safetensors_io.MAX_HOLE_BYTES = max_hole
        try:
            model = load_model(cases["hf"][0], tp_mesh=meshes[4])
        finally:
            safetensors_io.os.preadv, safetensors_io.MAX_HOLE_BYTES = real_preadv, saved
        results["bytes"][mode] = (sum(reads), len(reads), _expected_reads(model, mode))
    return results


def _expected_reads(model, mode):
    """(bytes, calls) of loading an fp32 model's shards, from the shards' shapes alone."""
    from parallel.layers import local_tensor

    nbytes = calls = 0
    for p in model.parameters():
        local = local_tensor(p)
        columns = p.dim() == 2 and local.shape[1] != p.shape[1]
        if columns and mode == "bands":
            nbytes, calls = nbytes + ((local.shape[0] - 1) * p.shape[1] + local.shape[1]) * 4, calls + 1
        else:
            nbytes, calls = nbytes + local.numel() * 4, calls + (local.shape[0] if columns else 1)
    return nbytes, calls


def test_converted_checkpoints_load_on_any_mesh_like_meta_reference(fx, tmp_path):
    cases = {}
    for name, src, args, weights in [
        ("hf", fx.hf, ARGS, fx.hf_weights),
        ("hf_tied_bf16", fx.hf_tied, TIED, {k: v.float() for k, v in fx.tied_weights.items()}),
        ("meta2", fx.meta2, ARGS, fx.meta_weights),
        ("meta4_kv_repeated", fx.meta4, TIED, fx.meta4_weights),
    ]:
        assert convert(src, tmp_path / name) == 0
        cases[name] = (str(tmp_path / name), args, weights)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    results = run_on_ranks(_load_worker, 4, cases, tokens)
    for rank_results in results:
        for mode, (read, calls, expected) in rank_results.pop("bytes").items():
            assert (read, calls) == expected, f"{mode}: a rank read {read} bytes in {calls} calls, not {expected}"
        for name, diffs in rank_results.items():
            assert max(diffs.values()) <= TOL, (name, diffs)


# ---------------------------------------------------------------- bad input


def _truncate(path):
    file = path / "model-00002-of-00003.safetensors"
    file.write_bytes(file.read_bytes()[:-10])


def _corrupt_header(path):
    file = path / "model-00002-of-00003.safetensors"
    data = bytearray(file.read_bytes())
    data[8:24] = b"\x00garbage\xff{{{{{{{{"
    file.write_bytes(bytes(data))


def _drop_from_index(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def _untie_differently(path):  # a tied config, but lm_head differs from the embeddings
    tensors = load_file(str(path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _pth(path, rank, state):
    torch.save(state, path / f"consolidated.{rank:02d}.pth")


def _meta_drop(path, name):
    for r in range(2):
        state = torch.load(path / f"consolidated.{r:02d}.pth", weights_only=True)
        del state[name]
        _pth(path, r, state)


def _meta_edit(path, rank, name, fn):
    state = torch.load(path / f"consolidated.{rank:02d}.pth", weights_only=True)
    state[name] = fn(state[name])
    _pth(path, rank, state)


BAD_INPUTS = {
    # name: (fixture to start from, how to break it, words the error line must hold)
    "truncated safetensors": ("hf", _truncate, ["model-00002-of-00003.safetensors", "truncated"]),
    "corrupt safetensors header": ("hf", _corrupt_header, ["model-00002-of-00003.safetensors", "corrupt"]),
    "index names a missing file": (
        "hf", lambda p: (p / "model-00003-of-00003.safetensors").unlink(),
        ["model.safetensors.index.json", "model-00003-of-00003.safetensors", "does not exist"]),
    "tensor missing": ("hf", _drop_from_index, ["model.layers.1.mlp.up_proj.weight", "missing"]),
    "shapes do not fit the config": (
        "hf", lambda p: _edit_config(p, intermediate_size=160),
        ["model-00001-of-00003.safetensors: tensor model.layers.0.mlp.", "192", "160", "config.json"]),
    "missing config": ("hf", lambda p: (p / "config.json").unlink(), ["config.json", "not found"]),
    "unreadable config": ("hf", lambda p: (p / "config.json").write_text("{not json"), ["config.json", "cannot read"]),
    "config without a key": ("hf", lambda p: _drop_key(p, "hidden_size"),
                             ["config.json", "hidden_size"]),
    "tied config but a different lm_head": ("hf_tied", _untie_differently, ["lm_head.weight", "tie_word_embeddings"]),
    "dcp without model_args.json": ("dcp", lambda p: (p.parent / "model_args.json").unlink(),
                                    ["DCP checkpoint", "model_args.json"]),
    "empty directory": ("empty", lambda p: None, ["empty directory"]),
    "not a checkpoint": ("empty", lambda p: (p / "notes.txt").write_text("hi"), ["no checkpoint found"]),
    "pth with pickled objects": (
        "meta2", lambda p: _pth(p, 1, {"x": argparse.Namespace(a=1)}),
        ["consolidated.01.pth", "refused", "argparse.Namespace"]),
    "pth with a non-tensor entry": (
        "meta2", lambda p: _pth(p, 0, {"tok_embeddings.weight": torch.zeros(2), "step": 5}),
        ["consolidated.00.pth", "'step'", "not a tensor"]),
    "pth that is not a checkpoint": (
        "meta2", lambda p: (p / "consolidated.01.pth").write_bytes(b"\x00" * 100),
        ["consolidated.01.pth", "not a readable PyTorch checkpoint"]),
    "meta rank missing": ("meta2", lambda p: (p / "consolidated.00.pth").unlink(), ["not numbered 00..00"]),
    "meta tensor missing": ("meta2", lambda p: _meta_drop(p, "layers.1.feed_forward.w3.weight"),
                            ["layers.1.feed_forward.w3.weight", "missing"]),
    "meta missing params.json": ("meta2", lambda p: (p / "params.json").unlink(), ["params.json", "not found"]),
    "meta shards do not fit params.json": (
        "meta2", lambda p: _meta_edit(p, 1, "layers.0.attention.wo.weight", lambda w: w[:, :-2].clone()),
        ["consolidated.01.pth", "layers.0.attention.wo.weight"]),
    # found only while writing: the partial output must be removed
    "repeated kv heads differ": (
        "meta4", lambda p: _meta_edit(p, 1, "layers.1.attention.wv.weight", lambda w: w + 1),
        ["consolidated.01.pth", "layers.1.attention.wv.weight", "differs"]),
    "norm differs between ranks": (
        "meta2", lambda p: _meta_edit(p, 1, "norm.weight", lambda w: w * 2),
        ["consolidated.01.pth", "norm.weight", "differs"]),
}


def _drop_key(path, key):
    config = json.loads((path / "config.json").read_text())
    del config[key]
    (path / "config.json").write_text(json.dumps(config))


def assert_failed_cleanly(capsys, out: Path, code: int, words):
    err = capsys.readouterr().err
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists() and not out.parent.exists()  # nothing left, not even the directory made for OUT


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_with_one_line_and_leaves_nothing(fx, tmp_path, capsys, case):
    base, breakage, words = BAD_INPUTS[case]
    src = tmp_path / "src"
    if base == "empty":
        src.mkdir()
    elif base == "dcp":
        src = tmp_path / "run" / "step"
        write_dcp(src, ARGS, fx.meta_weights)
    else:
        shutil.copytree(getattr(fx, base), src)
    breakage(src)
    out = tmp_path / "out" / "ckpt"
    assert_failed_cleanly(capsys, out, convert(src, out), words)


@pytest.mark.parametrize("argv, words", [
    (["--max-shard-size", "5XB"], ["--max-shard-size", "5XB"]),
    (["--to-hf", "--eos-id", "end"], ["--eos-id", "end"]),
])
def test_bad_flag_values_name_the_flag(fx, tmp_path, capsys, argv, words):
    out = tmp_path / "out" / "ckpt"
    assert_failed_cleanly(capsys, out, convert(fx.meta2, out, *argv), words)


def test_existing_out_is_replaced_only_with_overwrite(fx, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert(fx.meta2, out) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    assert convert(fx.meta2, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_command_line(fx, tmp_path):
    """The real entry point: one error line and no traceback on bad input; --help names
    every option."""
    src = tmp_path / "src"
    shutil.copytree(fx.hf, src)
    _truncate(src)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, str(REPO / "convert_weights.py"), str(src), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "model-00002-of-00003.safetensors" in bad.stderr, bad.stderr
    assert not (tmp_path / "out").exists()
    help_text = subprocess.run([sys.executable, str(REPO / "convert_weights.py"), "--help"],
                               capture_output=True, text=True, env=env, timeout=120).stdout
    for option in ["--to-hf", "--dtype", "--max-shard-size", "--bos-id", "--eos-id", "--overwrite", "--quiet",
                   "--tie-word-embeddings", "--no-tie-word-embeddings", "--rope-scale-factor"]:
        assert option in help_text
