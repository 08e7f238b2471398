"""Convert Llama 3 checkpoints to the project's format, and back to Hugging Face's.

  python convert_weights.py SRC OUT             Hugging Face or Meta checkpoint -> ours
  python convert_weights.py --to-hf CKPT OUT    ours (or any source below) -> Hugging Face

SRC is recognised by its files:
  config.json + *.safetensors [+ model.safetensors.index.json]   Hugging Face
  params.json + consolidated.NN.pth (one per model-parallel rank)  Meta's original download
  model_args.json + *.safetensors                                 already converted (re-shard, cast)
  .metadata + *.distcp, model_args.json here or one level up      DCP training checkpoint

Every source becomes the same thing: a list of tensors in Meta's names and Meta's RoPE
layout, each read only when it is written. The writers stream them into safetensors
files one at a time (header first: every shape is known from the source's headers), so
peak memory is about one tensor, not the checkpoint; tensors that need no change are
copied file to file without passing through Python. Output goes to a temporary
directory next to OUT, is verified, and only then renamed to OUT.
"""

import argparse
import json
import os
import pickle
import re
import shutil
import signal
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

from llama.config import ModelArgs
from llama.weights import (
    ARGS_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsWriter,
    copy_file,
    expected_shapes,
    header_bytes,
    nbytes_of,
    read_checkpoint_meta,
    read_header,
    read_tensor,
    tensor_bytes,
    verify_checkpoint,
    weight_map,
    write_model_args,
)

DEFAULT_SHARD_SIZE = "5GB"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
LLAMA3_BOS, LLAMA3_EOS = 128000, 128001
PROGRESS_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal

# ---------------------------------------------------------------- Hugging Face names and RoPE layout

HF_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Derived tables some exports store; the model computes them itself.
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
META_IGNORED = {"rope.freqs"}


def to_hf_name(name: str) -> str:
    if name in HF_TOP_NAMES:
        return HF_TOP_NAMES[name]
    layer, _, rest = name.removeprefix("layers.").partition(".")
    return f"model.layers.{layer}.{HF_LAYER_NAMES[rest]}"


def from_hf_name(hf: str) -> Optional[str]:
    for ours, theirs in HF_TOP_NAMES.items():
        if hf == theirs:
            return ours
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    for ours, theirs in HF_LAYER_NAMES.items():
        if match and match.group(2) == theirs:
            return f"layers.{match.group(1)}.{ours}"
    return None


def rope_heads(name: str, args: ModelArgs) -> Optional[int]:
    """Number of heads whose rows q/k weights permute between the layouts; None for others."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


# Meta's RoPE rotates interleaved pairs (x0, x1), (x2, x3)... of each head; HF's rotates
# the two halves. HF's q/k rows are Meta's reordered inside each head to match.
def hf_to_meta_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def meta_to_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


# ---------------------------------------------------------------- sources


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

    def display(self, name: str) -> str:
        return to_hf_name(name) if self.kind == "hf" else name


def read_args(reader, file: Path) -> ModelArgs:
    """ModelArgs from a config file; any complaint, e.g. a value of the wrong type, names the file."""
    try:
        return reader(file)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        message = str(err)
        raise ValueError(message if str(file) in message else f"{file}: not a usable config: {message}") from None


def open_source(path: Path) -> Source:
    if not path.exists():
        raise ValueError(f"{path}: does not exist")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory; SRC is a checkpoint directory")
    if (path / ".metadata").is_file():
        return dcp_source(path)
    if (path / ARGS_FILE).is_file():
        return ours_source(path)
    if (path / "config.json").exists() or any(path.glob("*.safetensors")):
        return hf_source(path)
    if (path / "params.json").exists() or any(path.glob("consolidated.*.pth")):
        return meta_source(path)
    if not any(path.iterdir()):
        raise ValueError(f"{path}: empty directory; expected a checkpoint")
    raise ValueError(
        f"{path}: no checkpoint found: expected config.json + *.safetensors (Hugging Face), "
        f"params.json + consolidated.NN.pth (Meta), {ARGS_FILE} (converted) or .metadata (DCP)"
    )


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


def meta_source(path: Path) -> Source:
    params = path / "params.json"
    args = read_args(ModelArgs.from_meta_params, params)
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise ValueError(f"{path}: no consolidated.NN.pth files next to params.json")
    numbers = [f.name.split(".")[1] for f in files]
    if numbers != [f"{rank:02d}" for rank in range(len(files))]:
        raise ValueError(
            f"{path}: consolidated files {numbers} are not numbered 00..{len(files) - 1:02d}; a rank's file is missing"
        )
    shards = [load_pth(file) for file in files]
    for file, shard in zip(files[1:], shards[1:]):
        differ = sorted(set(shard) ^ set(shards[0]))
        if differ:
            raise ValueError(f"{file}: tensor {differ[0]} is in only one of {file.name} and {files[0].name}")
    shapes = expected_shapes(args)
    source = Source("meta", path, params, args, {})
    for name in shards[0]:
        if name in META_IGNORED:
            continue
        tied = name == "output.weight" and args.tie_word_embeddings
        if name not in shapes and not tied:
            raise ValueError(
                f"{files[0]}: unexpected tensor {name}; not a Llama 3 checkpoint, or {params.name} does not match it"
            )
        full = shapes.get(name, (args.vocab_size, args.dim))
        tensor = meta_tensor(files, [shard[name] for shard in shards], name, full, params)
        if tied:
            source.tied_output = tensor
        else:
            source.tensors[name] = tensor
    source.tensors = {name: source.tensors[name] for name in shapes if name in source.tensors}  # model order
    return source


def load_pth(file: Path) -> dict:
    """A Meta shard, memory-mapped, and never by running pickled code."""
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = re.search(r"WeightsUnpickler error: ([^\n]*)", str(err))
        reason = (reason.group(1) if reason else str(err).splitlines()[0]).split(" was not an allowed global")[0]
        raise ValueError(
            f"{file}: refused: it holds more than plain tensors ({reason}), and loading it would run pickled code; "
            "re-save it as a dict of tensors"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{file}: not a readable PyTorch checkpoint ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: holds a {type(state).__name__}, not a dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            what = type(value).__name__
            raise ValueError(f"{file}: entry {key!r} is a {what}, not a tensor; expected a dict of tensors")
    return state


def meta_split_dim(name: str) -> Optional[int]:
    """The dim Meta's model-parallel ranks split a tensor along; None: every rank holds it."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("wo.weight", "w2.weight")):
        return 1
    return 0  # tok_embeddings (Llama 3; Llama 2 split it along dim 1), output, wq wk wv w1 w3


def meta_tensor(files: list, pieces: list, name: str, full: tuple, params: Path) -> SourceTensor:
    shape, dtype = tuple(pieces[0].shape), pieces[0].dtype
    for file, piece in zip(files, pieces):
        if tuple(piece.shape) != shape or piece.dtype != dtype:
            raise ValueError(
                f"{file}: tensor {name} is {list(piece.shape)} {piece.dtype}, in {files[0].name} {list(shape)} {dtype}"
            )
    where = f"{files[0].parent / 'consolidated.*.pth'}: tensor {name}"
    n, dim = len(pieces), meta_split_dim(name)
    if name == "tok_embeddings.weight" and n > 1 and shape[0] == full[0] and shape[1] * n == full[1]:
        dim = 1  # a Llama 2 style split
    if n == 1 or dim is None:
        if shape != full:
            raise ValueError(f"{where} has shape {list(shape)}; {params.name} implies {list(full)}")
        return SourceTensor(name, dtype, full, partial(_replicated, pieces, files, name), f"{files[0]}: tensor {name}")
    total = shape[dim] * n
    copies = total // full[dim] if total % full[dim] == 0 else 0
    kv = name.endswith(("wk.weight", "wv.weight"))
    other_dims_fit = all(shape[d] == full[d] for d in range(len(full)) if d != dim)
    if not other_dims_fit or not (copies == 1 or (kv and copies > 1 and n % copies == 0)):
        raise ValueError(
            f"{where}: {n} shards of shape {list(shape)} do not merge into {list(full)}, "
            f"the shape {params.name} implies"
        )
    return SourceTensor(name, dtype, full, partial(_merged, pieces, files, name, dim, copies), where)


def _replicated(pieces: list, files: list, name: str) -> torch.Tensor:
    for file, piece in zip(files[1:], pieces[1:]):
        if not torch.equal(piece, pieces[0]):
            raise ValueError(f"{file}: tensor {name} differs from {files[0].name}'s; it should be alike on every rank")
    return pieces[0]


def _merged(pieces: list, files: list, name: str, dim: int, copies: int) -> torch.Tensor:
    """Concatenate the ranks' slices; with more ranks than kv heads, consecutive ranks hold
    the same kv head (16 ranks, 8 kv heads: each twice) and one copy is kept."""
    for rank in range(len(pieces)) if copies > 1 else ():
        first = rank - rank % copies
        if rank != first and not torch.equal(pieces[rank], pieces[first]):
            raise ValueError(
                f"{files[rank]}: tensor {name} differs from {files[first].name}'s; with {len(pieces)} ranks "
                f"each kv head should appear {copies} times"
            )
    return torch.cat(pieces[::copies], dim=dim)


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
    meta = read_checkpoint_meta(args_dir)
    config = args_dir / ARGS_FILE
    args = read_args(lambda file: ModelArgs.from_dict(meta["model_args"], source=str(file)), config)
    try:
        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as err:  # DCP raises a variety of errors for a bad .metadata
        raise ValueError(f"{path / '.metadata'}: unreadable DCP metadata ({type(err).__name__}: {err})") from None
    source = Source("dcp", path, config, args, {}, hf=meta.get("hf"))
    for name in expected_shapes(args):
        key = next((k for k in (f"model.{name}", name) if k in stored), None)
        if key is None:
            continue  # reported as missing by check_source
        entry = stored[key]
        if not hasattr(entry, "size"):
            raise ValueError(f"{path}: entry {key} is not a tensor")
        shape, dtype = tuple(entry.size), entry.properties.dtype
        read = partial(_read_dcp, path, key, shape, dtype)
        source.tensors[name] = SourceTensor(name, dtype, shape, read, f"{path}: tensor {key}")
    return source


def _read_dcp(path: Path, key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    import torch.distributed.checkpoint as dcp

    tensor = torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({key: tensor}, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    return tensor


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


# ---------------------------------------------------------------- writing


@dataclass
class OutTensor:
    name: str  # name in the output
    dtype: torch.dtype
    source: SourceTensor
    transform: Optional[Callable] = None  # layout change on the way out (HF's RoPE order)

    @property
    def shape(self) -> tuple:
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)

    @property
    def unchanged(self) -> bool:
        """The source's stored bytes are the output's bytes."""
        src = self.source
        return src.stored is not None and src.as_stored and self.transform is None and self.dtype == src.dtype


@dataclass
class OutFile:
    file: str
    tensors: list  # [OutTensor] in file order
    metadata: dict


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '2GiB' -> 2 * 2**30, as Hugging Face reads --max-shard-size."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    number, prefix, unit = match.groups()
    base = 1024 if unit == "IB" else 1000
    size = int(float(number) * base ** " KMGT".index(prefix or " "))
    if size <= 0:
        raise ValueError(f"--max-shard-size {text!r}: must be positive")
    return size


def plan_files(outs: dict, source: Source, max_shard: Optional[int]) -> list:
    """The output files: the source's layout (file names, grouping, order) unless a shard
    size is given or the source has none; else files of at most max_shard bytes (a
    larger tensor gets a file of its own), in the model's order."""
    if max_shard is None and source.layout:
        return [OutFile(s.file, [outs[n] for n in s.names], s.metadata or {"format": "pt"}) for s in source.layout]
    max_shard = max_shard or parse_size(DEFAULT_SHARD_SIZE)
    groups, size = [[]], 0
    for out in outs.values():
        if groups[-1] and size + out.nbytes > max_shard:
            groups.append([])
            size = 0
        groups[-1].append(out)
        size += out.nbytes
    if len(groups) == 1:
        return [OutFile(SINGLE_FILE, groups[0], {"format": "pt"})]
    n = len(groups)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    return [OutFile(name, group, {"format": "pt"}) for name, group in zip(names, groups)]


def write_files(out_dir: Path, files: list, progress: "Progress") -> None:
    for out_file in files:
        specs = [(t.name, t.dtype, t.shape) for t in out_file.tensors]
        source_header = same_bytes_source(out_file, specs)
        if source_header is not None:
            progress.advance(copy_and_patch(out_dir / out_file.file, out_file, specs, source_header))
            continue
        with SafetensorsWriter(out_dir / out_file.file, specs, out_file.metadata) as writer:
            for tensor in out_file.tensors:
                progress.advance(write_tensor(writer, tensor))


def write_tensor(writer: SafetensorsWriter, out: OutTensor) -> int:
    if out.unchanged:
        return writer.copy(out.name, *out.source.stored)
    return writer.write(out.name, out_tensor(out))


def out_tensor(out: OutTensor) -> torch.Tensor:
    tensor = out.source.read()
    if out.transform is not None:
        tensor = out.transform(tensor)
    return tensor.to(out.dtype)


# When a file is converted as a whole (HF <-> ours with the layout kept and the dtype
# unchanged), every tensor's bytes sit in the same order and size in the source file, and
# only the names and the q/k row order change. Copying the file whole is the kernel's
# fastest copy (a reflink on copy-on-write filesystems: no data copied at all); then the
# header is rewritten, padded to the source header's length so that every offset stays,
# and the q/k tensors are rewritten in place.
def same_bytes_source(out_file: OutFile, specs: list):
    """The header of the source file this output file can be copied from, or None."""
    stored = [t.source.stored for t in out_file.tensors]
    if not stored or None in stored or len({file for file, _, _ in stored}) != 1:
        return None
    header = read_header(stored[0][0])
    whole = [(start, end) for _, start, end in stored] == [(i.start, i.end) for i in header.tensors.values()]
    if not whole or any(t.nbytes != end - start for t, (_, start, end) in zip(out_file.tensors, stored)):
        return None
    if len(header_bytes(specs, out_file.metadata)) > header.data_start:
        return None  # the new names do not fit in the old header's room
    return header


def copy_and_patch(dst: Path, out_file: OutFile, specs: list, source_header) -> int:
    copy_file(source_header.file, dst)
    with open(dst, "r+b", buffering=0) as f:
        os.pwrite(f.fileno(), header_bytes(specs, out_file.metadata, size=source_header.data_start), 0)
        for tensor in out_file.tensors:
            if not tensor.unchanged:
                data, offset = tensor_bytes(out_tensor(tensor).contiguous()), tensor.source.stored[1]
                while data:  # one write moves at most ~2 GB on Linux
                    written = os.pwrite(f.fileno(), data, offset)
                    data, offset = data[written:], offset + written
    return sum(t.nbytes for t in out_file.tensors)


def write_index(out_dir: Path, files: list, metadata: Optional[dict] = None) -> None:
    """An index when there are several files (or one not named model.safetensors), in
    transformers' style: sorted keys, total_size in bytes."""
    if len(files) == 1 and files[0].file == SINGLE_FILE:
        return
    metadata = {**(metadata or {}), "total_size": sum(t.nbytes for f in files for t in f.tensors)}
    weight_map = {t.name: f.file for f in files for t in f.tensors}
    index = {"metadata": metadata, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def check_files(out_dir: Path, files: list) -> None:
    """Re-open what was written: every header parses, matches the plan, and the file
    holds exactly the bytes it describes."""
    from safetensors import safe_open

    for out_file in files:
        header = read_header(out_dir / out_file.file)
        written = {name: (info.dtype, info.shape) for name, info in header.tensors.items()}
        planned = {t.name: (t.dtype, t.shape) for t in out_file.tensors}
        if written != planned:
            wrong = sorted(set(written.items()) ^ set(planned.items()))[0][0]
            raise RuntimeError(f"{out_dir / out_file.file}: tensor {wrong} not as planned after writing")
        with safe_open(str(out_dir / out_file.file), framework="pt"):
            pass  # the safetensors library accepts the header too


def write_ours(source: Source, out_dir: Path, dtype, max_shard, progress: "Progress") -> list:
    outs = {name: OutTensor(name, dtype or t.dtype, t) for name, t in source.tensors.items()}
    files = plan_files(outs, source, max_shard)
    progress.start(sum(t.nbytes for f in files for t in f.tensors))
    write_files(out_dir, files, progress)
    write_index(out_dir, files)
    write_model_args(source.args, out_dir, {"hf": source.hf} if source.hf else None)
    check_files(out_dir, files)
    if verify_checkpoint(out_dir) != source.args:
        raise RuntimeError(f"{out_dir / ARGS_FILE}: does not read back as the source's model args")
    return files


def write_hf(source: Source, out_dir: Path, dtype, max_shard, bos, eos, progress: "Progress") -> list:
    args = source.args
    outs = {}
    for name, tensor in source.tensors.items():
        heads = rope_heads(name, args)
        transform = partial(meta_to_hf_rope, n_heads=heads) if heads else None
        outs[name] = OutTensor(to_hf_name(name), dtype or tensor.dtype, tensor, transform)
    files = plan_files(outs, source, max_shard)
    progress.start(sum(t.nbytes for f in files for t in f.tensors))
    write_files(out_dir, files, progress)
    index_metadata = (source.hf or {}).get("index_metadata")
    write_index(out_dir, files, index_metadata)
    write_hf_config(source, out_dir, outs["tok_embeddings.weight"].dtype, bos, eos)
    check_files(out_dir, files)
    return files


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype, bos, eos) -> dict:
    rope = None
    if args.use_scaled_rope:
        rope = {
            "factor": args.rope_scale_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "original_max_position_embeddings": args.rope_original_context,
            "rope_type": "llama3",
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": LLAMA3_BOS if bos is None else bos,
        "eos_token_id": LLAMA3_EOS if eos is None else eos,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "hidden_size": args.dim,
        "initializer_range": 0.02,
        "intermediate_size": args.ffn_hidden_dim,
        "max_position_embeddings": args.max_seq_len,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": args.n_heads,
        "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.n_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": args.norm_eps,
        "rope_scaling": rope,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_word_embeddings,
        "torch_dtype": HF_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")),
        "use_cache": True,
        "vocab_size": args.vocab_size,
    }


def write_hf_config(source: Source, out_dir: Path, dtype: torch.dtype, bos, eos) -> None:
    """The source's own config.json when it still describes the model (it keeps keys we do
    not model, e.g. a list of eos ids), with dtype and ids updated; else one generated
    from the model args. Either is checked by reading it back."""
    file = out_dir / "config.json"
    original = (source.hf or {}).get("config")
    if original:
        config = dict(original)
        dtype_key = "dtype" if "dtype" in config else "torch_dtype"  # transformers >= 4.56 writes "dtype"
        config[dtype_key] = HF_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
        if bos is not None:
            config["bos_token_id"] = bos
        if eos is not None:
            config["eos_token_id"] = eos
        file.write_text(json.dumps(config, indent=2) + "\n")
        try:
            if same_model(ModelArgs.from_hf_config(file), source.args):
                return
        except ValueError:
            pass  # not a config we can still use: generate one
    file.write_text(json.dumps(hf_config_from_args(source.args, dtype, bos, eos), indent=2) + "\n")
    if not same_model(ModelArgs.from_hf_config(file), source.args):
        raise RuntimeError(f"{file}: does not read back as the model args it was written from")


def same_model(a: ModelArgs, b: ModelArgs) -> bool:
    """Equal up to how the FFN width is spelled (HF stores it, Meta derives it)."""
    def canonical(args):
        return replace(args, ffn_hidden_size=args.ffn_hidden_dim, multiple_of=256, ffn_dim_multiplier=None)

    return canonical(a) == canonical(b)


# ---------------------------------------------------------------- progress


class Progress:
    """Bytes written and the rate, on stderr: redrawn in place on a terminal, a line every
    PROGRESS_EVERY seconds otherwise (logs), nothing when quiet."""

    def __init__(self, quiet: bool, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.total = self.done = 0
        self.t0 = self.last = time.monotonic()
        self.drawn = False  # a progress line is on the terminal

    def start(self, total: int) -> None:
        self.total, self.done = total, 0
        self.t0 = self.last = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.quiet or now - self.last < (0.5 if self.tty else PROGRESS_EVERY):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0
        line = f"{self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB  {rate / 1e6:.0f} MB/s  ETA {eta:.0f} s"
        self.stream.write(f"\r{line}  " if self.tty else f"{line}\n")
        self.stream.flush()
        self.drawn = self.tty

    def clear(self) -> None:
        """Take the progress line off the terminal, so the next message starts clean."""
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False


# ---------------------------------------------------------------- command line


def parse_token_ids(text: Optional[str], flag: str):
    """'128001' -> 128001, '128001,128009' -> [128001, 128009]."""
    if text is None:
        return None
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected an integer or comma-separated integers") from None
    return ids[0] if len(ids) == 1 else ids


def check_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: OUT is the source; write to another directory")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ValueError(f"{out}: already exists; pass --overwrite to replace it")


def move_into_place(tmp: Path, out: Path) -> None:
    """Swap the finished tmp in; an old OUT is removed only after the new one is in place."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def convert(opts: argparse.Namespace) -> str:
    src, out = Path(opts.src), Path(opts.out)
    check_out(src, out, opts.overwrite)
    dtype = DTYPES[opts.dtype] if opts.dtype else None
    max_shard = parse_size(opts.max_shard_size) if opts.max_shard_size else None
    eos = parse_token_ids(opts.eos_id, "--eos-id")
    source = open_source(src)
    check_source(source)  # all of the input checked before OUT is touched

    created = [p for p in reversed(out.absolute().parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    progress = Progress(opts.quiet)
    tmp.mkdir()
    try:
        if opts.to_hf:
            files = write_hf(source, tmp, dtype, max_shard, opts.bos_id, eos, progress)
        else:
            files = write_ours(source, tmp, dtype, max_shard, progress)
        move_into_place(tmp, out)
        progress.clear()
    except BaseException:
        progress.clear()
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):  # the directories made for OUT, if still empty
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    seconds = time.monotonic() - progress.t0
    kind = "Hugging Face" if opts.to_hf else "converted"
    n_tensors = sum(len(f.tensors) for f in files)
    return (
        f"wrote {kind} checkpoint {out}: {n_tensors} tensors in {len(files)} files, {progress.total / 1e9:.2f} GB "
        f"in {seconds:.1f} s ({progress.total / 1e6 / max(seconds, 1e-9):.0f} MB/s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_weights.py",
        description="\n\n".join(__doc__.split("\n\n")[:3]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python convert_weights.py Llama-3.1-8B/ ckpt/8b\n"
            "  python convert_weights.py Llama3.1-405B-MP16/ ckpt/405b --dtype bf16 --max-shard-size 10GB\n"
            "  python convert_weights.py --to-hf ckpt/8b hf/8b --eos-id 128001,128008,128009"
        ),
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint directory to read (its files tell its kind, see above)")
    parser.add_argument(
        "out", metavar="OUT",
        help="directory to create; written under a temporary name beside it, renamed to OUT once complete and checked",
    )
    parser.add_argument(
        "--to-hf", action="store_true",
        help="write a Hugging Face checkpoint (config.json, safetensors in HF names and RoPE layout, index) "
        "instead of the project's format",
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES),
        help="dtype of the written weights (default: keep each tensor's dtype from SRC)",
    )
    parser.add_argument(
        "--max-shard-size", metavar="SIZE",
        help="largest output file, e.g. 5GB, 500MB, 2GiB (GB = 10^9, GiB = 2^30); larger checkpoints are split "
        f"into model-0000K-of-0000N.safetensors with an index (default: SRC's file layout, else {DEFAULT_SHARD_SIZE})",
    )
    parser.add_argument(
        "--bos-id", type=int, metavar="ID",
        help=f"with --to-hf: bos_token_id in config.json (default: SRC's HF config if it had one, else {LLAMA3_BOS})",
    )
    parser.add_argument(
        "--eos-id", metavar="ID[,ID...]",
        help=f"with --to-hf: eos_token_id, one id or comma-separated ids (default: SRC's HF config, else {LLAMA3_EOS})",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists (only once the new one is complete)"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser


def main(argv=None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        summary = convert(opts)
    except (ValueError, OSError) as err:
        # bad input: one line naming the file, tensor or flag, no traceback
        print(f"convert_weights.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"convert_weights.py: interrupted; {opts.out} not written", file=sys.stderr)
        return 130
    if not opts.quiet:
        print(summary, file=sys.stderr)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # so that the temporary directory is removed on the way out


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
