"""A Hugging Face checkpoint (config.json + *.safetensors [+ index]) read as a Source: HF
names mapped to ours, q/k rows permuted to Meta's RoPE layout when read, every other
tensor's stored bytes usable as they are."""

import json
from functools import partial
from pathlib import Path

import torch

from ..config import ModelArgs
from .format import INDEX_FILE
from .names import HF_IGNORED, from_hf_name, hf_to_meta_rope, rope_heads
from .safetensors_io import read_header, read_tensor
from .source import Shard, Source, SourceTensor, read_args


def hf_source(path: Path) -> Source:
    config = path / "config.json"
    args = read_args(ModelArgs.from_hf_config, config)
    source = Source("hf", path, config, args, {}, layout=[])
    files, index_metadata = hf_files(path)
    source.hf = {"config": json.loads(config.read_text()), "index_metadata": index_metadata}
    for file, listed in files:
        header = read_header(file)
        missing = sorted(set(listed or ()) - set(header.tensors))
        if missing:
            raise ValueError(f"{file}: tensor {missing[0]} missing (the index {INDEX_FILE} places it in this file)")
        shard = Shard(file.name, metadata=header.metadata)
        for hf, info in header.tensors.items():
            if listed is not None and hf not in listed:
                continue  # the index is the truth, as for transformers
            ours = from_hf_name(hf)
            if ours is None and HF_IGNORED.fullmatch(hf):
                continue
            if ours is None:
                raise ValueError(f"{file}: unexpected tensor {hf}; not a Llama checkpoint?")
            if ours in source.tensors:
                raise ValueError(f"{file}: tensor {hf} also in {source.tensors[ours].where.split(': ')[0]}")
            read = partial(read_tensor, file, info)
            heads = rope_heads(ours, args)
            if heads is not None:
                read = partial(_permuted, read, heads, hf_to_meta_rope)
            stored = (file, info.start, info.end)
            tensor = SourceTensor(ours, info.dtype, info.shape, read, f"{file}: tensor {hf}", stored, heads is None)
            if ours == "output.weight" and args.tie_word_embeddings:
                source.tied_output = tensor
                continue
            source.tensors[ours] = tensor
            shard.names.append(ours)
        if shard.names:
            source.layout.append(shard)
    return source


def _permuted(read, heads: int, permute) -> torch.Tensor:
    return permute(read(), heads)


def hf_files(path: Path) -> tuple:
    """[(file, names the index places in it, or None without an index)], index metadata."""
    index = path / INDEX_FILE
    if not index.is_file():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path}: no *.safetensors files next to config.json")
        return [(file, None) for file in files], None
    try:
        data = json.loads(index.read_text())
        by_file = {}
        for name, file in data["weight_map"].items():
            by_file.setdefault(file, set()).add(name)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index}: unreadable index ({type(err).__name__}: {err})") from None
    for file in sorted(by_file):
        if not (path / file).is_file():
            raise ValueError(f"{index}: names {file}, which does not exist in {path}")
    return [(path / file, by_file[file]) for file in sorted(by_file)], data.get("metadata") or {}
