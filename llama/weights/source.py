"""A checkpoint read as a stream of named tensors (our names, Meta's layout): the Source
every reader returns, and check_source, its check against the config before anything
is written. The readers are hf.py, meta.py, format.py (ours) and dcp.py; kinds.py
tells which one a directory needs.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import ModelArgs
from .names import expected_shapes, to_hf_name
from .safetensors_io import nbytes_of


@dataclass
class SourceTensor:
    """One tensor of a source, in our name and Meta's layout, read only when written."""

    name: str
    dtype: torch.dtype
    shape: tuple
    read: Callable[[], torch.Tensor]
    where: str  # "file: tensor name-in-the-source", for messages
    stored: Optional[tuple] = None  # (file, start, end): its bytes in a safetensors file
    as_stored: bool = False  # those bytes are already this tensor (no permutation)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


@dataclass
class Shard:
    """One safetensors file of a layout: its name, tensors (our names, in order) and
    header metadata."""

    file: str
    names: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


@dataclass
class Source:
    kind: str  # "hf", "meta", "ours" or "dcp"
    path: Path
    config: Path  # the file the args came from
    args: ModelArgs
    tensors: dict  # our name -> SourceTensor
    layout: Optional[list] = None  # [Shard]: the source's files, kept by default
    hf: Optional[dict] = None  # {"config": HF config.json, "index_metadata": ...}, for the way back
    tied_output: Optional[SourceTensor] = None  # an output matrix stored although the config ties it
    notes: list = field(default_factory=list)  # what was assumed where the config does not say, and why

    def display(self, name: str) -> str:
        return to_hf_name(name) if self.kind == "hf" else name


def read_args(reader, file: Path) -> ModelArgs:
    """ModelArgs from a config file; any complaint, e.g. a value of the wrong type, names the file."""
    try:
        return reader(file)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        message = str(err)
        raise ValueError(message if str(file) in message else f"{file}: not a usable config: {message}") from None


def check_source(source: Source) -> None:
    """Every tensor the config implies is present with its shape, nothing else is; before
    anything is written."""
    shapes = expected_shapes(source.args)
    for name, tensor in source.tensors.items():
        if name not in shapes:
            raise ValueError(f"{tensor.where}: unexpected; not part of the model {source.config} describes")
        if tensor.shape != shapes[name]:
            want = list(shapes[name])
            raise ValueError(f"{tensor.where} has shape {list(tensor.shape)}; {source.config} implies {want}")
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{tensor.where} has dtype {tensor.dtype}; weights must be floating point")
    missing = [name for name in shapes if name not in source.tensors]
    if missing:
        raise ValueError(
            f"{source.path}: tensor {source.display(missing[0])} missing ({len(missing)} missing; "
            f"{source.config.name} describes {source.args.n_layers} layers)"
        )
    if source.tied_output is not None:
        check_tied_output(source)


def check_tied_output(source: Source) -> None:
    """A stored output matrix that the config ties to the embeddings is dropped, but only
    if it really is the embedding matrix: otherwise dropping it would change the model."""
    stored, embeddings = source.tied_output, source.tensors["tok_embeddings.weight"]
    if stored.shape != embeddings.shape or not torch.equal(stored.read(), embeddings.read()):
        raise ValueError(
            f"{stored.where}: {source.config} ties the output to the embeddings, but this matrix differs from them; "
            f"set tie_word_embeddings to false in {source.config.name}"
        )
