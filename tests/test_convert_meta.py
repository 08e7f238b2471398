"""convert_weights.py with Meta's original checkpoints: rank shards merged along the
documented dims, repeated kv heads kept once, exported to Hugging Face; and what
params.json does not say (a tied output, the RoPE scale factor) decided from the tensors
and the shapes, or by the flags, and said. Fixtures: tests/convert_fixtures.py."""

import json
from dataclasses import replace

import pytest
import torch

import convert_weights
import llama.config
import llama.weights.meta
from llama import ModelArgs
from llama.config import meta_rope_scale_factor
from llama.weights.format import read_model_args
from llama.weights.hf_config import same_model
from llama.weights.kinds import open_source
from llama.weights.source import check_source
from parallel.spawn import run_on_ranks
from tests.convert_fixtures import (
    ARGS,
    ROPE,
    TIED,
    TOL,
    Fixtures,
    assert_failed_cleanly,
    assert_same_tensors,
    convert,
    hf_tensors,
    meta_weights,
    read_all,
    write_meta,
)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return Fixtures(tmp_path_factory.mktemp("sources"))


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
    assert same_model(ModelArgs.from_hf_config(out), ARGS)


def test_default_token_ids_and_dtype_in_generated_config(fx, tmp_path):
    out = tmp_path / "hf"
    assert convert("--to-hf", fx.meta4, out, "--dtype", "bf16") == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (128000, 128001, "bfloat16")
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in read_all(out)


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
