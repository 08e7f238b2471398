"""Meta's original checkpoint (params.json + consolidated.NN.pth, one per model-parallel
rank) read as a Source: the rank pieces merged along Meta's split dims, repeated kv
heads kept once, and what params.json does not say (a tied output, the RoPE scale
factor) decided and noted. Shards are memory-mapped and never unpickle code."""

import json
import pickle
import re
import zipfile
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelArgs, meta_rope_scale_factor
from .names import META_IGNORED, expected_shapes
from .source import Source, SourceTensor, read_args


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
