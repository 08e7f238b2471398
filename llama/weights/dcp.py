"""A training checkpoint (train.py's step_N: a torch.distributed.checkpoint directory) read
as a Source tensor by tensor, or straight into a sharded model's DTensors."""

import warnings
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelArgs
from .format import ARGS_FILE, read_checkpoint_meta
from .names import expected_shapes
from .source import Source, SourceTensor, read_args


def is_training_checkpoint(path) -> bool:
    """A torch.distributed.checkpoint directory (train.py's step_N) rather than our format."""
    return (Path(path) / ".metadata").is_file()


def dcp_source(path: Path) -> Source:
    """A training checkpoint written by torch.distributed.checkpoint: model tensors under
    "model.<name>" (or bare names), read one at a time whatever mesh wrote them.
    model_args.json sits in the checkpoint directory or its parent."""
    from torch.distributed.checkpoint import FileSystemReader

    args_dir = next((d for d in (path, path.parent) if (d / ARGS_FILE).is_file()), None)
    if args_dir is None:
        raise ValueError(
            f"{path}: a DCP checkpoint, but no {ARGS_FILE} in it or in {path.parent}; copy there the {ARGS_FILE} "
            "of the converted checkpoint the training started from"
        )
    check_not_adapters_only(path)
    meta = read_checkpoint_meta(args_dir)
    config = args_dir / ARGS_FILE
    args = read_args(lambda file: ModelArgs.from_dict(meta["model_args"], source=str(file)), config)
    try:
        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as err:  # DCP raises a variety of errors for a bad .metadata
        raise ValueError(f"{path / '.metadata'}: unreadable DCP metadata ({type(err).__name__}: {err})") from None
    source = Source("dcp", path, config, args, {}, hf=meta.get("hf"))
    for name in expected_shapes(args):
        key = dcp_key(name, stored)
        if key is None:
            continue  # reported as missing by check_source
        entry = stored[key]
        if not hasattr(entry, "size"):
            raise ValueError(f"{path}: entry {key} is not a tensor")
        shape, dtype = tuple(entry.size), entry.properties.dtype
        read = partial(_read_dcp, path, key, shape, dtype)
        source.tensors[name] = SourceTensor(name, dtype, shape, read, f"{path}: tensor {key}")
    return source


def check_not_adapters_only(path: Path) -> None:
    """A LoRA run's checkpoint holds its adapters, not a model (its trainer.json records the
    base they adapt): say what to do with it instead of listing the base's tensors as missing."""
    import json

    trainer = path / "trainer.json"
    if trainer.is_file() and json.loads(trainer.read_text()).get("base"):
        raise ValueError(
            f"{path}: a LoRA run's checkpoint, holding its adapters only; export them with convert_weights.py "
            "--to-peft, merge them with --to-hf --merge-lora, or load them with load_model(BASE, adapter=...) / "
            "llama.generate --checkpoint BASE --adapter"
        )


def dcp_key(name: str, stored) -> Optional[str]:
    """The key of our tensor `name` in a DCP checkpoint's metadata: "model.<name>", as
    train.py saves it beside the optimizer's state, or the bare name; None if absent."""
    return next((k for k in (f"model.{name}", name) if k in stored), None)


def read_dcp_shards_(path: Path, tensors: dict, process_group=None) -> None:
    """Fill `tensors` (our name -> an allocated tensor, or a DTensor holding this rank's
    shards) from the DCP checkpoint at `path`, whatever mesh wrote it. dcp.load plans the
    reads from the DTensors' placements, so a rank reads only the stored chunks that overlap
    its own shards (each chunk whole: FileSystemReader reads one and slices it), not every
    tensor whole. `process_group`: the ranks that load these DTensors together; None for
    plain tensors in one process. Run `check_source(dcp_source(path))` first."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(path))
    stored = reader.read_metadata().state_dict_metadata
    state = {dcp_key(name, stored): tensor for name, tensor in tensors.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, process_group=process_group, no_dist=process_group is None)


def _read_dcp(path: Path, key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    import torch.distributed.checkpoint as dcp

    tensor = torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({key: tensor}, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    return tensor
