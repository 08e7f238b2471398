"""The project's checkpoint format: its files, model_args.json, its index, writing a small
one, and reading one back as a Source.

A converted checkpoint is a directory:
  model_args.json                 {"format": FORMAT, "model_args": {...ModelArgs...}}
                                  (+ "hf": the source's config.json, kept for the way back)
  model.safetensors               tensors in Meta's names and Meta's RoPE layout, or
  model-0000K-of-0000N.safetensors + model.safetensors.index.json  (HF-style index)
"""

import json
from functools import partial
from pathlib import Path
from typing import Optional

from ..config import ModelArgs
from .safetensors_io import SafetensorsWriter, read_header, read_tensor
from .source import Shard, Source, SourceTensor, read_args

FORMAT = "llama-tp-safetensors/1"
ARGS_FILE = "model_args.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# ---------------------------------------------------------------- model_args.json


def read_model_args(path) -> ModelArgs:
    meta = read_checkpoint_meta(path)
    return ModelArgs.from_dict(meta["model_args"], source=str(Path(path) / ARGS_FILE))


def read_checkpoint_meta(path) -> dict:
    """The whole of model_args.json, checked to be this format."""
    path = Path(path)
    file = path / ARGS_FILE
    if not file.is_file():
        hint = " (a Hugging Face or Meta checkpoint? convert it first: python convert_weights.py SRC OUT)"
        raise ValueError(f"{file}: not found; {path} is not a converted checkpoint{hint}")
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: unreadable: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{file}: format {found!r} is not {FORMAT!r}")
    if not isinstance(meta.get("model_args"), dict):
        raise ValueError(f"{file}: no 'model_args' object")
    return meta


def write_model_args(args: ModelArgs, out_dir, extra: Optional[dict] = None) -> None:
    """`extra`: more top-level keys, e.g. "hf" (the source's config.json) for the way back."""
    meta = {"format": FORMAT, "model_args": args.to_dict(), **(extra or {})}
    (Path(out_dir) / ARGS_FILE).write_text(json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------- the index


def weight_map(path) -> dict:
    """tensor name -> safetensors file holding it."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            names = json.loads(index.read_text())["weight_map"]
            files = {name: path / file for name, file in names.items()}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index}: unreadable index: {err}") from None
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise ValueError(f"{index}: names {file.name}, which does not exist")
        return files
    single = path / SINGLE_FILE
    if not single.is_file():
        raise ValueError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    return {name: single for name in read_header(single).tensors}


# ---------------------------------------------------------------- writing a small one


def save_checkpoint(state_dict: dict, args: ModelArgs, out_dir) -> Path:
    """Write a small, fully materialised state dict (Meta names and layout) in the project's
    format. Large checkpoints are streamed by convert_weights.py instead."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if args.tie_word_embeddings:
        tensors.pop("output.weight", None)
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with SafetensorsWriter(out / SINGLE_FILE, specs, {"format": "pt"}) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
    write_model_args(args, out)
    return out


# ---------------------------------------------------------------- reading one as a Source


def ours_source(path: Path) -> Source:
    meta = read_checkpoint_meta(path)
    config = path / ARGS_FILE
    args = read_args(lambda file: ModelArgs.from_dict(meta["model_args"], source=str(file)), config)
    source = Source("ours", path, config, args, {}, layout=[], hf=meta.get("hf"))
    files = weight_map(path)
    for file in sorted(set(files.values())):
        header = read_header(file)
        shard = Shard(file.name, metadata=header.metadata)
        listed = {name for name, f in files.items() if f == file}
        missing = sorted(listed - set(header.tensors))
        if missing:
            raise ValueError(f"{file}: tensor {missing[0]} missing (the index {INDEX_FILE} places it in this file)")
        for name, info in header.tensors.items():
            if name in listed:
                read = partial(read_tensor, file, info)
                stored = (file, info.start, info.end)
                where = f"{file}: tensor {name}"
                source.tensors[name] = SourceTensor(name, info.dtype, info.shape, read, where, stored, as_stored=True)
                shard.names.append(name)
        source.layout.append(shard)
    return source
