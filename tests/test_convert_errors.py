"""convert_weights.py on bad input: every broken source, bad flag value or existing OUT
fails with one line naming the culprit, exit code 1, no traceback, and nothing left on
disk. Fixtures: tests/convert_fixtures.py."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.convert_fixtures import ARGS, REPO, Fixtures, assert_failed_cleanly, convert, write_dcp


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return Fixtures(tmp_path_factory.mktemp("sources"))


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


def test_command_line_fails_in_one_line_and_help_names_every_option(fx, tmp_path):
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
