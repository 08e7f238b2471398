"""Convert Llama 3 checkpoints to the project's format, and back to Hugging Face's.

  python convert_weights.py SRC OUT             Hugging Face or Meta checkpoint -> ours
  python convert_weights.py --to-hf CKPT OUT    ours (or any source below) -> Hugging Face
  python convert_weights.py --to-peft RUN/step_N OUT            a LoRA run's adapters -> PEFT adapter
  python convert_weights.py --to-hf --merge-lora RUN/step_N OUT  its base + scale * B A -> Hugging Face

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
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

from llama.weights.hf_config import LLAMA3_BOS, LLAMA3_EOS, write_hf_config
from llama.weights.format import ARGS_FILE, INDEX_FILE, SINGLE_FILE, write_model_args
from llama.weights.kinds import open_source
from llama.weights.loading import verify_checkpoint
from llama.weights.names import meta_to_hf_rope, rope_heads, to_hf_name
from llama.weights.peft import ADAPTER_CONFIG, ADAPTER_FILE, merged_source, open_run, write_peft
from llama.weights.safetensors_io import (
    SafetensorsWriter,
    copy_file,
    header_bytes,
    nbytes_of,
    read_header,
    tensor_bytes,
)
from llama.weights.source import Source, SourceTensor, check_source

DEFAULT_SHARD_SIZE = "5GB"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROGRESS_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal

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


def check_meta_flags(source: Source, opts: argparse.Namespace) -> None:
    """The flags that fill in what a Meta params.json may not say mean nothing for other kinds."""
    if opts.tie_word_embeddings is not None:
        flag = "--tie-word-embeddings" if opts.tie_word_embeddings else "--no-tie-word-embeddings"
    elif opts.rope_scale_factor is not None:
        flag = "--rope-scale-factor"
    else:
        return
    if source.kind != "meta":
        raise ValueError(
            f"{flag}: only for a Meta checkpoint (params.json + consolidated.NN.pth); "
            f"{source.path} is not one, and its {source.config.name} says this already"
        )


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


def check_lora_flags(opts: argparse.Namespace) -> None:
    if opts.to_peft and (opts.to_hf or opts.merge_lora):
        raise ValueError("--to-peft writes the adapters alone; --to-hf --merge-lora writes the merged model: give one")
    if opts.merge_lora and not opts.to_hf:
        raise ValueError("--merge-lora writes a Hugging Face checkpoint: add --to-hf")
    if opts.base and not opts.merge_lora:
        raise ValueError("--base: only with --to-hf --merge-lora (the base the adapters are merged into)")


def open_lora_source(src: Path, opts: argparse.Namespace) -> Source:
    """--merge-lora: the run's base (--base, else the one its trainer.json records, checked
    by fingerprint) with its adapters merged in."""
    run = open_run(src)
    base = run.check_base(opts.base)
    return merged_source(run, open_source(base))


def convert(opts: argparse.Namespace) -> str:
    src, out = Path(opts.src), Path(opts.out)
    check_out(src, out, opts.overwrite)
    check_lora_flags(opts)
    dtype = DTYPES[opts.dtype] if opts.dtype else None
    max_shard = parse_size(opts.max_shard_size) if opts.max_shard_size else None
    eos = parse_token_ids(opts.eos_id, "--eos-id")
    factor = opts.rope_scale_factor
    if factor is not None and not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"--rope-scale-factor {factor:g}: must be a positive number")
    run = source = None
    if opts.to_peft:
        run = open_run(src)  # checked before OUT is touched
    elif opts.merge_lora:
        source = open_lora_source(src, opts)
    else:
        source = open_source(src, opts.tie_word_embeddings, factor)
    if source is not None:
        check_meta_flags(source, opts)
        check_source(source)  # all of the input checked before OUT is touched
    for note in [] if opts.quiet or source is None else source.notes:
        print(f"convert: {note}", file=sys.stderr)

    created = [p for p in reversed(out.absolute().parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    progress = Progress(opts.quiet)
    tmp.mkdir()
    try:
        if run is not None:
            progress.total, files = write_peft(run, tmp, dtype=dtype), []
        elif opts.to_hf:
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
    kind = "PEFT adapter" if run is not None else "Hugging Face" if opts.to_hf else "converted"
    if run is not None:
        return (f"wrote {kind} {out}: {ADAPTER_FILE} ({len(run.shapes)} tensors, {progress.total / 1e6:.2f} MB) "
                f"and {ADAPTER_CONFIG}")
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
        "--to-peft", action="store_true",
        help="SRC is a LoRA run's checkpoint (train.py --lora-rank, SAVE_DIR/step_N): write its adapters as a PEFT "
        f"adapter ({ADAPTER_FILE} in HF names and RoPE layout, {ADAPTER_CONFIG}) for PeftModel or vLLM",
    )
    parser.add_argument(
        "--merge-lora", action="store_true",
        help="with --to-hf, SRC a LoRA run's checkpoint: write its base with the adapters merged in, "
        "W + scale * B A in the base's dtype",
    )
    parser.add_argument(
        "--base", metavar="DIR",
        help="with --merge-lora: the converted base checkpoint (default: the run's --checkpoint, as its trainer.json "
        "records it); checked against the run's fingerprint of it",
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
        "--tie-word-embeddings", action=argparse.BooleanOptionalAction,
        help="Meta SRC: whether the output layer is tied to (is the same matrix as) the embeddings (default: "
        "params.json's tie_word_embeddings, else the tensors decide: tied when consolidated.00.pth holds no "
        "output.weight or one equal to tok_embeddings.weight, untied otherwise)",
    )
    parser.add_argument(
        "--rope-scale-factor", type=float, metavar="F",
        help="Meta SRC with use_scaled_rope: the RoPE scale factor (default: params.json's rope_scale_factor, else "
        "32 for the Llama 3.2 1B and 3B shapes with tied output, else 8, the factor Meta's reference code uses)",
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
