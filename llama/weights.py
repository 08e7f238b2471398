"""The project's checkpoint format and `load_model`.

A converted checkpoint is a directory:
  model_args.json                 {"format": FORMAT, "model_args": {...ModelArgs...}}
  model.safetensors               tensors in Meta's names and Meta's RoPE layout, or
  model-0000K-of-0000N.safetensors + model.safetensors.index.json  (HF-style index)
Safetensors lets each rank read only the bytes of its own shard (a memory-mapped
slice), so a checkpoint loads on any mesh without a conversion step.
"""

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.device_mesh import DeviceMesh

from parallel.layers import local_slices, local_tensor

from .config import ModelArgs
from .model import Transformer

FORMAT = "llama-tp-safetensors/1"
ARGS_FILE = "model_args.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_model_args(path) -> ModelArgs:
    path = Path(path)
    file = path / ARGS_FILE
    if not file.is_file():
        hint = " (a Hugging Face or Meta checkpoint? convert it first: python convert_weights.py SRC OUT)"
        raise ValueError(f"{file}: not found; {path} is not a converted checkpoint{hint}")
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: unreadable: {err}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file}: format {meta.get('format')!r} is not {FORMAT!r}")
    return ModelArgs.from_dict(meta["model_args"], source=str(file))


def weight_map(path) -> dict:
    """tensor name -> safetensors file holding it."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            names = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index}: unreadable index: {err}") from None
        files = {name: path / file for name, file in names.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise ValueError(f"{index}: names {file.name}, which does not exist")
        return files
    single = path / SINGLE_FILE
    if not single.is_file():
        raise ValueError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err})") from None


def expected_tensors(model: Transformer) -> dict:
    """Checkpoint name -> parameter; a tied output shares tok_embeddings and is not stored."""
    return dict(model.named_parameters())


def load_weights_(model: Transformer, path) -> None:
    """Copy a converted checkpoint into an allocated model, each rank reading its shards only."""
    files = weight_map(path)
    params = expected_tensors(model)
    missing = sorted(set(params) - set(files))
    if missing:
        raise ValueError(f"{path}: tensor {missing[0]} missing from the checkpoint ({len(missing)} missing)")
    handles = {}
    try:
        with torch.no_grad():
            for name, param in params.items():
                file = files[name]
                if file not in handles:
                    handles[file] = _open(file).__enter__()
                try:
                    source = handles[file].get_slice(name)
                    shape = tuple(source.get_shape())
                except SafetensorError as err:
                    raise ValueError(f"{file}: tensor {name}: {err}") from None
                if shape != tuple(param.shape):
                    raise ValueError(
                        f"{file}: tensor {name} has shape {list(shape)}, the config wants {list(param.shape)}; "
                        "does model_args.json belong to these weights?"
                    )
                local_tensor(param).copy_(source[local_slices(param)])
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)


def load_model(
    path,
    tp_mesh: Optional[DeviceMesh] = None,
    dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    device=None,
) -> Transformer:
    """The model of a converted checkpoint, with this rank's shards read from disk."""
    args = read_model_args(path)
    if device is None:
        device = tp_mesh.device_type if tp_mesh is not None else "cpu"
        if device == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    with torch.device("meta"):
        model = Transformer(args, tp_mesh, sequence_parallel=sequence_parallel)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    load_weights_(model, path)
    return model


def save_checkpoint(state_dict: dict, args: ModelArgs, out_dir) -> Path:
    """Write a small, fully materialised state dict (Meta names and layout) in the project's
    format. Large checkpoints are streamed by convert_weights.py instead."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state_dict.items() if not (args.tie_word_embeddings and k == "output.weight")}
    save_file(tensors, str(out / SINGLE_FILE))
    write_model_args(args, out)
    return out


def write_model_args(args: ModelArgs, out_dir) -> None:
    (Path(out_dir) / ARGS_FILE).write_text(json.dumps({"format": FORMAT, "model_args": args.to_dict()}, indent=2) + "\n")
