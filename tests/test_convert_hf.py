"""convert_weights.py with Hugging Face checkpoints: in to the project's format with Meta's
names and layout, back out bit-exact, re-sharded and cast on the way; and a training
checkpoint out to Hugging Face. Fixtures: tests/convert_fixtures.py."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llama.weights.format import read_model_args
from tests.convert_fixtures import (
    ARGS,
    Fixtures,
    assert_same_tensors,
    convert,
    ffn_as_width,
    hf_tensors,
    read_all,
)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return Fixtures(tmp_path_factory.mktemp("sources"))


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


def test_training_checkpoint_exports_to_hf_cast_on_the_way(fx, tmp_path):
    """A DCP directory (model tensors under "model.", model_args.json one level up) exports
    like a converted checkpoint, cast on the way."""
    assert convert("--to-hf", fx.dcp, tmp_path / "hf", "--dtype", "bf16") == 0
    want = {k: v.to(torch.bfloat16) for k, v in hf_tensors(ARGS, fx.meta_weights).items()}
    assert_same_tensors(read_all(tmp_path / "hf"), want)
