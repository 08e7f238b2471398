"""load_model: a converted or a training checkpoint into a model, each rank reading the
bytes of its own shards only; verify_checkpoint, the same checks without the reading."""

import os
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.device_mesh import DeviceMesh

from parallel.layers import local_slices, local_tensor
from parallel.mesh import local_device

from ..config import ModelArgs
from ..model import Transformer
from .dcp import dcp_source, is_training_checkpoint, read_dcp_shards_
from .format import read_model_args, weight_map
from .names import expected_tensors
from .safetensors_io import BAND_BYTES, read_block_, read_header, tensor_bytes
from .source import check_source


def _locate(model: Transformer, path) -> dict:
    """name -> (file, TensorInfo) for every parameter, checked against the headers (names
    and shapes) before anything large is allocated."""
    files = weight_map(path)
    params = expected_tensors(model)
    missing = sorted(set(params) - set(files))
    if missing:
        raise ValueError(f"{path}: tensor {missing[0]} missing from the checkpoint ({len(missing)} missing)")
    headers = {file: read_header(file) for file in sorted(set(files[name] for name in params))}
    located = {}
    for name, param in params.items():
        file = files[name]
        info = headers[file].tensors.get(name)
        if info is None:
            raise ValueError(f"{file}: tensor {name} missing (the index says it is in this file)")
        if info.shape != tuple(param.shape):
            raise ValueError(
                f"{file}: tensor {name} has shape {list(info.shape)}, the config wants {list(param.shape)}; "
                "does model_args.json belong to these weights?"
            )
        located[name] = (file, info)
    return located


def verify_checkpoint(path) -> ModelArgs:
    """Check a converted checkpoint without loading it: model_args.json reads, and every
    tensor the model needs is where the index says, with the right shape."""
    args = read_model_args(path)
    with torch.device("meta"):
        model = Transformer(args)
    _locate(model, path)
    return args


def load_weights_(model: Transformer, path, located: Optional[dict] = None) -> None:
    """Copy a converted checkpoint into an allocated model, each rank reading the bytes of
    its own shards only."""
    located = located or _locate(model, path)
    params = expected_tensors(model)
    scratch = tensor_bytes(torch.empty(BAND_BYTES, dtype=torch.uint8))  # pages taken as bands use them
    fds = {}
    try:
        with torch.no_grad():
            for name, param in params.items():
                file, info = located[name]
                if file not in fds:
                    fds[file] = os.open(file, os.O_RDONLY)
                    if hasattr(os, "posix_fadvise"):  # reads are strided: no read-ahead of other ranks' bytes
                        os.posix_fadvise(fds[file], 0, 0, os.POSIX_FADV_RANDOM)
                read_block_(local_tensor(param), fds[file], info, local_slices(param), file, scratch)
    finally:
        for fd in fds.values():
            os.close(fd)


def load_model(
    path,
    tp_mesh: Optional[DeviceMesh] = None,
    dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    device=None,
    adapter=None,
) -> Transformer:
    """The model of a converted checkpoint, with this rank's shards read from disk. `path`
    may also be a training checkpoint (train.py's step_N, a DCP directory), from which
    each rank reads the stored chunks that overlap its shards. `adapter`: a LoRA run's
    checkpoint (RUN/step_N) whose adapters are attached, unmerged, with the run's config;
    `path` must be the base it trained on (checked by fingerprint)."""
    if adapter is not None:
        return _load_adapted(path, adapter, tp_mesh, dtype, sequence_parallel, device)
    training = is_training_checkpoint(path)
    if training:
        source = dcp_source(Path(path))
        check_source(source)
        args = source.args
    else:
        args = read_model_args(path)
    if device is None:
        device = local_device(tp_mesh.device_type if tp_mesh is not None else "cpu")
    with torch.device("meta"):
        model = Transformer(args, tp_mesh, sequence_parallel=sequence_parallel)
    located = None if training else _locate(model, path)
    model.to(dtype=dtype)
    model.to_empty(device=device)  # Transformer keeps a tied output tied through this
    if not training:
        load_weights_(model, path, located)
        return model
    group = None if tp_mesh is None else tp_mesh.get_group()
    with torch.no_grad():
        read_dcp_shards_(Path(path), expected_tensors(model), group)
    return model


def _load_adapted(path, adapter, tp_mesh, dtype, sequence_parallel, device) -> Transformer:
    """load_model(base, adapter=RUN/step_N): the adapters' config, shapes and base checked
    before anything is allocated, then the base read as usual and the adapters from DCP."""
    from ..lora import add_adapters, is_adapter
    from .peft import open_run

    run = open_run(adapter)  # its adapters match its recorded config: rank, targets
    base = run.check_base(path)
    args = read_model_args(base)
    if device is None:
        device = local_device(tp_mesh.device_type if tp_mesh is not None else "cpu")
    with torch.device("meta"):
        model = Transformer(args, tp_mesh, sequence_parallel=sequence_parallel)
        add_adapters(model, run.lora)
    located = _locate(model, base)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    load_weights_(model, base, located)
    adapters = {name: param for name, param in model.named_parameters() if is_adapter(name)}
    group = None if tp_mesh is None else tp_mesh.get_group()
    with torch.no_grad():
        read_dcp_shards_(Path(adapter), adapters, group)
    return model
