"""Read any checkpoint kind (Hugging Face safetensors, Meta consolidated.*.pth, our format,
a DCP training checkpoint) as a stream of named tensors in our names and Meta's layout.

open_source(path) recognises the kind by its files and returns a Source whose tensors are
read only when asked for; check_source(source) checks them against the config.
"""

import json
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import ModelArgs, meta_rope_scale_factor
from .weights import (
    ARGS_FILE,
    INDEX_FILE,
    expected_shapes,
    nbytes_of,
    read_checkpoint_meta,
    read_header,
    read_tensor,
    weight_map,
)

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


def open_source(
    path: Path, tie_word_embeddings: Optional[bool] = None, rope_scale_factor: Optional[float] = None
) -> Source:
    """`tie_word_embeddings`, `rope_scale_factor`: the user's word on what a Meta
    checkpoint's params.json may not say (convert_weights.py's flags); other kinds ignore them."""
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
        return meta_source(path, tie_word_embeddings, rope_scale_factor)
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


def meta_source(
    path: Path, tie_word_embeddings: Optional[bool] = None, rope_scale_factor: Optional[float] = None
) -> Source:
    """Meta's consolidated.NN.pth shards, one per model-parallel rank. params.json may not say
    whether the output is tied nor, with use_scaled_rope, the RoPE scale factor: the given
    values decide, else params.json's, else the tensors (tied) and the shapes (the factor);
    source.notes says what was assumed."""
    params = path / "params.json"
    read_args(ModelArgs.from_meta_params, params)  # a broken params.json is reported before any shard is read
    said = json.loads(params.read_text())
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
    tied, tie_note = meta_tied(params, said.get("tie_word_embeddings"), tie_word_embeddings, files, shards)
    reader = partial(ModelArgs.from_meta_params, tie_word_embeddings=tied, rope_scale_factor=rope_scale_factor)
    args = read_args(reader, params)
    rope_note = meta_rope_note(params, said.get("rope_scale_factor"), rope_scale_factor, args)
    shapes = expected_shapes(args)
    source = Source("meta", path, params, args, {}, notes=[note for note in (tie_note, rope_note) if note])
    for name in shards[0]:
        if name in META_IGNORED or (name == "output.weight" and tied):
            continue  # a tied model's stored output: meta_tied found it equal to the embeddings
        if name not in shapes:
            raise ValueError(
                f"{files[0]}: unexpected tensor {name}; not a Llama 3 checkpoint, or {params.name} does not match it"
            )
        source.tensors[name] = meta_tensor(files, [shard[name] for shard in shards], name, shapes[name], params)
    source.tensors = {name: source.tensors[name] for name in shapes if name in source.tensors}  # model order
    return source


def meta_tied(params: Path, said: Optional[bool], given: Optional[bool], files: list, shards: list) -> tuple:
    """(whether the output layer is tied to the embeddings, a note or None). The tensors
    decide when neither the user nor params.json says: no output.weight, or one equal to
    tok_embeddings.weight, is tied; a distinct one is not."""
    stored = "output.weight" in shards[0]
    pieces = files[0].parent / "consolidated.*.pth"
    if given is None and said is None:
        unsaid = f"{params.name} does not say whether the output is tied"
        if not stored:
            return True, f"{unsaid}; no output.weight in {files[0].name}: tied"
        if meta_output_equals_embeddings(shards):
            return True, f"{unsaid}; output.weight equals tok_embeddings.weight in {pieces.name}: tied"
        return False, f"{unsaid}; output.weight differs from tok_embeddings.weight in {pieces.name}: untied"
    tied = bool(given if given is not None else said)
    if given is not None:
        who = "--tie-word-embeddings" if tied else "--no-tie-word-embeddings"
        fix = f"leave out {who}"
    else:
        who, fix = params.name, f"set tie_word_embeddings to {str(not tied).lower()} in {params.name}"
    if tied and stored and not meta_output_equals_embeddings(shards):
        raise ValueError(
            f"{pieces}: tensor output.weight differs from tok_embeddings.weight, but {who} ties them; {fix}"
        )
    if not tied and not stored:
        raise ValueError(f"{files[0]}: no output.weight, but {who} says the output is untied; {fix}")
    if given is None:
        return tied, None
    return tied, f"output {'tied' if tied else 'not tied'} to the embeddings ({who})"


def meta_rope_note(params: Path, said: Optional[float], given: Optional[float], args: ModelArgs) -> Optional[str]:
    """A note on the RoPE scale factor in `args` when params.json did not give it."""
    if not args.use_scaled_rope:
        if given is not None:
            raise ValueError(f"--rope-scale-factor: {params} has use_scaled_rope false; no RoPE scaling to set")
        return None
    if given is not None:
        return f"rope scale factor {given:g} (--rope-scale-factor)"
    if said is not None:
        return None
    factor, why = meta_rope_scale_factor(args)
    return f"rope scale factor {factor:g} ({why}; --rope-scale-factor overrides)"


# Bytes of each matrix compared at a time: the comparison stops at the first band that
# differs, so telling an untied 405B output from its embeddings reads one band of each.
COMPARE_BAND_BYTES = 64 << 20


def meta_output_equals_embeddings(shards: list) -> bool:
    """Whether output.weight equals tok_embeddings.weight, rank piece against rank piece, a
    band of rows at a time, straight from the memory-mapped shards: no merged copy of
    either matrix is made."""
    for shard in shards:
        output, embeddings = shard["output.weight"], shard.get("tok_embeddings.weight")
        if embeddings is None:
            return False  # reported as missing by check_source
        if output.dim() != 2 or output.shape != embeddings.shape or output.dtype != embeddings.dtype:
            return False  # e.g. Llama 2's embeddings, split along the other dim: never tied
        rows = max(1, COMPARE_BAND_BYTES // max(1, output.shape[1] * output.element_size()))
        for start in range(0, output.shape[0], rows):
            if not torch.equal(output[start : start + rows], embeddings[start : start + rows]):
                return False
    return True


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
