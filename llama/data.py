"""Pre-training data: a token cache on disk, packed windows, data-parallel batches.

1. `load_token_cache(sources, tokenizer)` tokenizes text files, `.jsonl` files
   (a "text" field per line) or directories of them once, into a uint32 memmap
   of all tokens plus an index of document offsets. Each document is framed as
   BOS + tokens + EOS. Later runs reuse the cache while the source files (paths
   and the sha256 of their bytes) and the tokenizer (its fingerprint) are
   unchanged. The cache records its largest token id (`max_token_id`), so a
   check against the model's vocabulary needs no scan. Files are read in parts
   of whole lines, tokenized in a background thread or in `workers` fresh
   processes, and written in corpus order: the same bytes whatever the number
   of workers. `python -m llama.data prepare` builds the caches train.py will
   open, ahead of time and on every core.
2. `PackedDataset(cache, seq_len, seed)` cuts the token stream into windows of
   seq_len + 1 tokens with stride seq_len: inputs are a window's first seq_len
   tokens, targets its last seq_len, and consecutive windows share one token so
   every token is a target exactly once per epoch (but the first, and a tail
   shorter than seq_len). Documents run across window boundaries (no padding).
   Windows are visited in a seeded random order, a fresh permutation per epoch
   (`Permutation(num_windows, seed, epoch)`, computed per lookup in O(1) memory). With `document_masking=True` each batch also carries
   window-local document ids (a document cut by the window's start is id 0):

       tokens        ... d r a g o n EOS | BOS t h e EOS | BOS a n ...
       document_ids    0 0 0 0 0 0  0    |  1  1 1 1  1  |  2  2 2

   With `documents=` (an index array, e.g. from `split_documents`) the stride
   packing runs over those documents only, concatenated virtually.
   Chat and instruction data (whole conversations per window, padding, labels)
   live in llama/chat.py; `encode_conversation` and friends are re-exported here.
3. The data position is one global sample counter. A micro-step consumes
   micro_batch * dp_size consecutive samples and dp rank r takes the r-th slice
   of micro_batch. After optimizer step s with global batch
   B = micro_batch * dp_size * grad_accum exactly s * B samples are consumed,
   whatever dp_size was, so a run can resume on another number of dp ranks
   without skipping or repeating a sample. Batches depend only on the dp rank:
   all tensor-parallel ranks of one dp group get identical batches.
   A batch is `Batch(inputs, targets, document_ids)`; targets are -100 where
   the loss does not apply (chat data only), and `step_target_tokens()` counts
   the targets of the next optimizer step on every rank without a collective.
4. Validation: `split_documents` holds out whole documents, and `eval_batches`
   yields the same fixed samples on any mesh.

Bad input raises `DataError` (a ValueError) with one line naming the file, the
line and the fix. Invalid UTF-8 is not an error: it is replaced with U+FFFD,
counted, and reported as a warning line on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import sysconfig
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from llama.tokenizer import Tokenizer, TokenizerFileError, load_tokenizer

PathLike = Union[str, os.PathLike]
Sources = Union[PathLike, Sequence[PathLike]]

# 2: keyed on the sha256 of the files' bytes instead of size and mtime; 3: records max_token_id
CACHE_VERSION = 3
HASH_CHUNK_BYTES = 16 << 20
IGNORE_INDEX = -100  # a target the loss skips (torch.nn.functional.cross_entropy's default)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")  # one file = one document
JSONL_SUFFIXES = (".jsonl",)  # one line = one document, its "text" field
PART_BYTES = 1 << 20  # the work handed to a tokenizing thread or process at once

# Stdlib modules with much prose in docstrings and comments: the demo corpus.
# Resolved as name.py or name/__init__.py so the list survives modules turning
# into packages across Python versions; missing ones are skipped.
DEFAULT_CORPUS_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "difflib", "doctest", "email.message",
    "enum", "fnmatch", "fractions", "functools", "gettext", "glob", "heapq", "http.client",
    "inspect", "ipaddress", "json", "json.decoder", "json.encoder", "logging", "optparse",
    "pathlib", "pickle", "pprint", "pydoc", "queue", "random", "sched", "shlex", "shutil",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "typing", "unittest.case", "urllib.parse", "zipfile",
)


class DataError(ValueError):
    """Bad training data or data settings; the message is one line naming the fix."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Sources


def default_corpus_paths() -> list[Path]:
    """A fixed list of Python standard library sources (~2.4 MB): real text on
    every machine with Python, no download needed."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for module in DEFAULT_CORPUS_MODULES:
        base = stdlib.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                paths.append(candidate)
                break
    if not paths:
        raise DataError(f"{stdlib}: no standard library .py sources found for the default corpus "
                        "(this Python ships compiled modules only); pass text files instead")
    return paths


def find_source_files(sources: Sources) -> list[Path]:
    """Expand files and directories into the list of data files, in a fixed order.

    Directories are searched recursively in sorted order for TEXT_SUFFIXES and
    JSONL_SUFFIXES files, skipping hidden files and directories (e.g. the
    .token_cache). Files given explicitly are taken whatever their suffix.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise DataError("no data sources given: pass text/.jsonl files or directories")
    files = []
    for source in (Path(s).resolve() for s in sources):
        if source.is_file():
            files.append(source)
        elif source.is_dir():
            found = sorted(
                f for f in source.rglob("*")
                if f.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(source).parts))
            if not found:
                raise DataError(f"{source}: empty corpus, the directory has no data files "
                                f"({', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)})")
            files += found
        else:
            raise DataError(f"{source}: no such data file or directory; check the path, or pass text/.jsonl "
                            "files or directories that exist")
    return files


def _decode_utf8(raw: bytes) -> tuple[str, int, int]:
    """(text, replacements made, 1-based line of the first bad byte or 0)."""
    try:
        return raw.decode("utf-8"), 0, 0
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8", errors="replace")
        replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
        return text, replaced, raw.count(b"\n", 0, e.start) + 1


@dataclass
class _FileReport:
    """Invalid UTF-8 that reading one file (or one part of it) replaced, for its warning line."""

    replaced: int = 0
    first_line: int = 0

    def add(self, replaced: int, line: int) -> None:
        if replaced and not self.replaced:
            self.first_line = line
        self.replaced += replaced


@dataclass
class FilePart:
    """A unit of work: a whole text file, or whole consecutive lines of a file read
    line by line (a .jsonl file, or any file holding conversation records)."""

    path: Path
    fmt: str  # "text", or a conversation format of llama/chat.py
    first_line: int  # 1-based line number of the first line in data
    data: bytes

    @property
    def by_lines(self) -> bool:
        return _read_by_lines(self.path, self.fmt)

    def numbered_lines(self) -> Iterator[tuple[int, bytes]]:
        return enumerate(self.data.split(b"\n"), self.first_line)


def _read_by_lines(path: Path, fmt: str) -> bool:
    return fmt != "text" or path.suffix in JSONL_SUFFIXES


def read_parts(path: Path, fmt: str = "text", part_bytes: int | None = None) -> Iterator[FilePart]:
    """A file as parts of about part_bytes (default PART_BYTES), cut only between lines:
    a text file is one document, so it stays one part, whatever its size."""
    part_bytes = part_bytes or PART_BYTES
    if not _read_by_lines(path, fmt):
        yield FilePart(path, fmt, 1, path.read_bytes())
        return
    first_line, carry = 1, b""
    with open(path, "rb") as f:
        while block := f.read(part_bytes):
            block = carry + block
            cut = block.rfind(b"\n") + 1  # 0: no line ends in it yet, read on
            data, carry = block[:cut], block[cut:]
            if data:
                yield FilePart(path, fmt, first_line, data)
                first_line += data.count(b"\n")
    if carry:
        yield FilePart(path, fmt, first_line, carry)


def chunks_of_parts(parts: Iterator[FilePart], chunk_bytes: int | None = None) -> Iterator[list[FilePart]]:
    """Consecutive parts grouped into chunks of up to chunk_bytes (default PART_BYTES; a
    larger part is a chunk of its own): many small files make one tokenizer call, not one each."""
    chunk_bytes, chunk, size = chunk_bytes or PART_BYTES, [], 0
    for part in parts:
        if chunk and size + len(part.data) > chunk_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(part)
        size += len(part.data)
    if chunk:
        yield chunk


def part_documents(part: FilePart, report: _FileReport) -> Iterator[str]:
    """The non-empty text documents of one part: the whole file, or the "text" field of each line."""
    if not part.by_lines:
        text, replaced, line = _decode_utf8(part.data)
        report.add(replaced, line)
        if text.strip():
            yield text
        return
    for lineno, raw in part.numbered_lines():
        if not raw.strip():
            continue
        line, replaced, _ = _decode_utf8(raw)
        report.add(replaced, lineno)
        yield from _text_field(part.path, lineno, line)


def _text_field(path: Path, lineno: int, line: str) -> Iterator[str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                        "each line must be one JSON object like {\"text\": \"...\"}") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object with a \"text\" field, "
                        f"got a JSON {type(record).__name__}")
    if "text" not in record:
        keys = ", ".join(list(record)[:8]) or "none"
        raise DataError(f"{path}:{lineno}: JSON object has no \"text\" field (keys: {keys}); "
                        "rename the field holding the document to \"text\"")
    if not isinstance(record["text"], str):
        raise DataError(f"{path}:{lineno}: \"text\" is a JSON {type(record['text']).__name__}, "
                        "expected a string")
    if record["text"]:
        yield record["text"]


# ---------------------------------------------------------------------------
# Encoding chunks in parallel, results in order


def default_workers() -> int:
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


_worker_tokenizer: Tokenizer | None = None  # set in each worker process by _init_worker


def _tokenizer_source(tokenizer: Tokenizer) -> Union[str, Tokenizer]:
    """What a worker loads its tokenizer from: a name or a path, or (for a tokenizer
    load_tokenizer cannot make) the object itself, pickled."""
    if tokenizer.kind == "bytes":
        return "bytes"
    model_path = getattr(tokenizer, "model_path", None)
    return str(model_path) if model_path is not None else tokenizer


def _init_worker(source: Union[str, Tokenizer], fingerprint: str) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    tokenizer = load_tokenizer(source) if isinstance(source, str) else source
    if tokenizer.fingerprint != fingerprint:
        raise DataError(f"{source}: the tokenizer changed while the cache was being built; run again")
    _worker_tokenizer = tokenizer


def _with_worker_tokenizer(fn: Callable, chunk):
    return fn(_worker_tokenizer, chunk)


def useful_workers(workers: int, total_bytes: int) -> int:
    """No more workers than chunks: a small corpus is not worth starting processes for."""
    return max(1, min(workers, -(-total_bytes // PART_BYTES)))


def _process_context():
    """Never fork: a forked copy of a process running threads (torch, tiktoken) can deadlock.
    forkserver where the platform has one: a fresh process imports the llama package (and
    torch with it) once, then forks every worker from that clean state in milliseconds,
    instead of each spawned worker paying seconds for its own imports. Else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # The package (torch) and not this module: under `python -m llama.data` each worker
    # runs this module as its __mp_main__, which must not be imported already.
    context.set_forkserver_preload(["llama"])
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        # Started with SIGINT ignored, the server and the workers it forks keep ignoring
        # it: Ctrl-C, sent to the whole process group, stops this process alone, with one
        # message instead of a traceback per process.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, previous)
    return context


def map_in_order(fn: Callable, tokenizer: Tokenizer, chunks: Iterator, workers: int = 1) -> Iterator:
    """fn(tokenizer, chunk) for every chunk, yielded in the order of the chunks.

    workers == 1: in a background thread of this process, so reading the next chunk
    overlaps encoding this one. workers > 1: in that many fresh processes (forkserver
    or spawn, never fork), each loading its own tokenizer by path (a tiktoken or
    SentencePiece object does not pickle cheaply). At most two chunks per worker are
    in flight, so memory stays bounded on a corpus of any size, and the first error
    in corpus order is the one raised.
    """
    if workers <= 1:
        pool = ThreadPoolExecutor(1)
        submit = lambda chunk: pool.submit(fn, tokenizer, chunk)  # noqa: E731
    else:
        pool = ProcessPoolExecutor(workers, mp_context=_process_context(), initializer=_init_worker,
                                   initargs=(_tokenizer_source(tokenizer), tokenizer.fingerprint))
        submit = lambda chunk: pool.submit(_with_worker_tokenizer, fn, chunk)  # noqa: E731
    in_flight: deque[Future] = deque()
    try:
        for chunk in chunks:
            in_flight.append(submit(chunk))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Progress:
    """How far a cache build is, on stderr: a bar redrawn in place on a terminal,
    otherwise a plain line at every further 10% of the bytes or 10 s, whichever is first."""

    LINE_EVERY_S = 10.0
    LINE_EVERY_FRACTION = 0.1
    BAR_EVERY_S = 0.2
    BAR_WIDTH = 24

    def __init__(self, verb: str, total_bytes: int, *, unit: str = "documents", quiet: bool = False,
                 stream=None):
        self.verb, self.unit, self.total, self.quiet = verb, unit, max(total_bytes, 1), quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = not quiet and self.stream.isatty()
        self.start = self.last_shown = time.perf_counter()
        self.steps_shown = 0  # whole LINE_EVERY_FRACTIONs done at the last line
        self.drawn = False

    def update(self, done_bytes: int, documents: int, tokens: int) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        fraction = min(done_bytes / self.total, 1.0)
        steps = int(fraction / self.LINE_EVERY_FRACTION + 1e-9)
        if self.tty:
            due = now - self.last_shown >= self.BAR_EVERY_S or fraction == 1.0
        else:
            due = steps > self.steps_shown or now - self.last_shown >= self.LINE_EVERY_S
        if not due:
            return
        if self.tty:
            self._show(f"\r{self._bar(fraction, done_bytes, documents, tokens, now)}\x1b[K")
            self.drawn = True
        else:
            self._show(f"{self._line(fraction, done_bytes, documents, tokens, now)}\n")
        self.last_shown, self.steps_shown = now, steps

    def finish(self, summary: str) -> None:
        if not self.quiet:
            self._show(("\r\x1b[K" if self.drawn else "") + summary + "\n")

    def _rates(self, fraction: float, done_bytes: int, now: float) -> tuple[float, str]:
        seconds = max(now - self.start, 1e-9)
        eta = seconds * (1 - fraction) / fraction if fraction > 0 else None
        return done_bytes / 1e6 / seconds, "?" if eta is None else f"{int(eta) // 60}:{int(eta) % 60:02d}"

    def _bar(self, fraction: float, done_bytes: int, documents: int, tokens: int, now: float) -> str:
        mb_per_s, eta = self._rates(fraction, done_bytes, now)
        filled = int(fraction * self.BAR_WIDTH)
        return (f"{self.verb} [{'#' * filled}{'.' * (self.BAR_WIDTH - filled)}] {100 * fraction:3.0f}% "
                f"{done_bytes / 1e6:.1f}/{self.total / 1e6:.1f} MB | {documents:,} {self.unit} | "
                f"{tokens:,} tokens | {mb_per_s:.1f} MB/s | ETA {eta}")

    def _line(self, fraction: float, done_bytes: int, documents: int, tokens: int, now: float) -> str:
        mb_per_s, eta = self._rates(fraction, done_bytes, now)
        return (f"{self.verb}: {100 * fraction:.0f}% ({done_bytes / 1e6:.1f}/{self.total / 1e6:.1f} MB), "
                f"{documents:,} {self.unit}, {tokens:,} tokens, {mb_per_s:.1f} MB/s, ETA {eta}")

    def _show(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


# ---------------------------------------------------------------------------
# Token cache


@dataclass
class TokenCache:
    """All documents' tokens, back to back, each framed as BOS ... EOS."""

    tokens: np.ndarray  # uint32 memmap, read-only
    doc_offsets: np.ndarray  # int64 [num_docs + 1] memmap, read-only: document i is
    #                          tokens[doc_offsets[i]:doc_offsets[i + 1]]
    files: list[Path]  # source files in tokenization order
    path: Path  # the cache's .json description; .tokens.u32 and .docs.npy sit next to it
    hit: bool  # True when loaded from disk without tokenizing
    invalid_utf8: int = 0  # byte sequences replaced with U+FFFD when it was built
    max_token_id: Optional[int] = None  # the largest id in tokens, recorded when the cache was built
    #                                     (check it against the model's vocabulary without a scan)

    def __post_init__(self):
        if self.max_token_id is None:  # a cache made in memory: scan it once
            self.max_token_id = largest_token_id(self.tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]

    def describe(self) -> str:
        return _describe(self.files)


def largest_token_id(tokens: np.ndarray, block: int = 1 << 26) -> int:
    """max(tokens), or -1 when empty; blockwise, so a memory-mapped array is not copied whole."""
    return max((int(tokens[i:i + block].max()) for i in range(0, len(tokens), block)), default=-1)


def _describe(files: list[Path]) -> str:
    return f"{files[0]} (+{len(files) - 1} more files)" if len(files) > 1 else str(files[0])


def default_cache_dir(sources: Sources) -> Path:
    """`.token_cache` in the directory holding the data, or a per-user cache
    directory when that one is read-only or inside the Python installation."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    bases = [p if p.is_dir() else p.parent for p in (Path(s).resolve() for s in sources)]
    common = Path(os.path.commonpath(bases))
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    if common == stdlib or stdlib in common.parents or not os.access(common, os.W_OK):
        user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return user_cache / "llama-token-cache"
    return common / ".token_cache"


def _sha256(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in large chunks. Size and mtime are not
    enough: a file rewritten within the same second at the same size keeps both."""
    h, buffer = hashlib.sha256(), bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def source_stats(files: list[Path]) -> list[tuple[str, int, str]]:
    """(path, size, sha256) per file: what a cache key is made of."""
    return [(str(f), f.stat().st_size, file_sha256(f)) for f in files]


def load_token_cache(sources: Sources, tokenizer: Tokenizer, cache_dir: PathLike | None = None, *,
                     quiet: bool = False, workers: int = 1, num_threads: int | None = None) -> TokenCache:
    """Tokenize `sources` into a cache, or open the cache a previous run left.

    The cache is reused while the source files (resolved paths and the sha256
    of their bytes) and `tokenizer.fingerprint` are unchanged; otherwise it is rebuilt in place.
    Files are written under temporary names and renamed, so an interrupted or
    concurrent build never leaves a cache that looks valid but is not. In a
    multi-process run, call it on one rank first, then barrier, then on all.
    A build tokenizes in `workers` processes (1: in this one, on `num_threads`
    threads, all cores by default); the cache is byte for byte the same either way.
    """
    files = find_source_files(sources)
    stats = source_stats(files)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(sources)
    # One slot per (source arguments, tokenizer): a changed file rebuilds the
    # slot instead of piling up stale caches.
    roots = sources if not isinstance(sources, (str, os.PathLike)) else [sources]
    slot = _sha256(*(str(Path(r).resolve()) for r in roots), tokenizer.fingerprint)[:16]
    key = _sha256(str(CACHE_VERSION), json.dumps(stats), tokenizer.fingerprint)
    meta_path = cache_dir / f"{slot}.json"

    cache = _open_cache(meta_path, key, files)
    if cache is not None:
        if not quiet:
            _log(f"token cache hit: {meta_path} ({cache.num_tokens:,} tokens, "
                 f"{cache.num_docs:,} documents from {len(files)} files)")
        return cache
    cache_dir.mkdir(parents=True, exist_ok=True)
    return _build_cache(files, stats, tokenizer, meta_path, key, quiet=quiet, workers=workers,
                        num_threads=num_threads)


def open_token_cache(meta_path: PathLike, sources: Sources) -> TokenCache:
    """The cache at `meta_path`, as another process of the run just built or found it, without
    hashing the sources again: in a multi-process run rank 0 calls load_token_cache and
    the others open its result (on a large corpus, each rank re-reading every file for its
    sha256 would multiply the start-up's reads by the number of ranks)."""
    return open_built_cache(meta_path, sources, _open_cache, "token cache")


def open_built_cache(meta_path: PathLike, sources: Sources, opener: Callable, what: str):
    """`opener(meta_path, key, files)` with the key the cache's description records."""
    meta_path = Path(meta_path)
    hint = "is --cache-dir on a filesystem every node sees?"
    try:
        key = json.loads(meta_path.read_text())["key"]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{meta_path}: {what} unreadable on this node ({err}); {hint}") from None
    cache = opener(meta_path, key, find_source_files(sources))
    if cache is None:
        raise DataError(f"{meta_path}: {what} incomplete on this node; {hint}")
    return cache


def _cache_paths(meta_path: Path) -> tuple[Path, Path]:
    stem = meta_path.with_suffix("")
    return stem.with_name(stem.name + ".tokens.u32"), stem.with_name(stem.name + ".docs.npy")


def _open_cache(meta_path: Path, key: str, files: list[Path]) -> TokenCache | None:
    tokens_path, docs_path = _cache_paths(meta_path)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or not tokens_path.is_file() or not docs_path.is_file():
        return None
    if tokens_path.stat().st_size != 4 * meta["num_tokens"]:
        return None  # truncated by a crash or a full disk: rebuild
    tokens = np.memmap(tokens_path, dtype="<u4", mode="r")
    # mapped, not loaded: 8 ranks per node on a 1B-document corpus would otherwise hold
    # 8 private copies of an 8 GB index; the page cache holds one, shared
    doc_offsets = np.load(docs_path, mmap_mode="r")
    return TokenCache(tokens, doc_offsets, files, meta_path, hit=True,
                      invalid_utf8=meta.get("invalid_utf8", 0), max_token_id=meta["max_token_id"])


@dataclass
class EncodedDocuments:
    """One chunk's documents, tokenized: what a worker sends back."""

    tokens: np.ndarray  # uint32, the documents back to back, each BOS ... EOS
    lengths: np.ndarray  # int64, tokens per document
    reports: list[tuple[Path, _FileReport]]  # per part: its invalid UTF-8
    num_bytes: int  # of the files' bytes


def encode_text_chunk(tokenizer: Tokenizer, chunk: list[FilePart],
                      num_threads: int | None = None) -> EncodedDocuments:
    texts, reports = [], []
    for part in chunk:
        report = _FileReport()
        texts += part_documents(part, report)
        reports.append((part.path, report))
    ids = tokenizer.encode_batch(texts, bos=True, eos=True, num_threads=num_threads)
    tokens = np.concatenate(ids).astype(np.uint32, copy=False) if ids else np.empty(0, np.uint32)
    return EncodedDocuments(tokens, np.array([len(i) for i in ids], dtype=np.int64), reports,
                            sum(len(part.data) for part in chunk))


class _TokenWriter:
    """Appends encoded chunks to the cache's token file, keeping what its description needs."""

    def __init__(self, out):
        self.out = out
        self.lengths: list[np.ndarray] = []  # tokens per document, a chunk at a time
        self.num_docs = self.num_tokens = 0
        self.max_token_id = -1

    def write(self, encoded: EncodedDocuments) -> None:
        self.out.write(encoded.tokens.astype("<u4", copy=False).tobytes())
        self.lengths.append(encoded.lengths)
        self.num_docs += len(encoded.lengths)
        self.num_tokens += len(encoded.tokens)
        self.max_token_id = max(self.max_token_id, largest_token_id(encoded.tokens))


def _build_cache(files: list[Path], stats: list, tokenizer: Tokenizer, meta_path: Path, key: str, *,
                 quiet: bool, workers: int, num_threads: int | None) -> TokenCache:
    tokens_path, docs_path = _cache_paths(meta_path)
    meta_path.unlink(missing_ok=True)  # the old cache is invalid from now on
    tmp = f".tmp{os.getpid()}"
    tokens_tmp = tokens_path.with_name(tokens_path.name + tmp)
    docs_tmp = docs_path.with_name(docs_path.name + tmp)
    total_bytes = sum(size for _, size, _ in stats)
    progress = Progress("tokenizing", total_bytes, quiet=quiet)
    workers = useful_workers(workers, total_bytes)
    reports = {path: _FileReport() for path in files}
    chunks = chunks_of_parts(part for path in files for part in read_parts(path))
    encode = partial(encode_text_chunk, num_threads=num_threads if workers <= 1 else 1)
    bytes_done = 0

    try:
        with open(tokens_tmp, "wb") as out:
            writer = _TokenWriter(out)
            for encoded in map_in_order(encode, tokenizer, chunks, workers):
                writer.write(encoded)
                for path, report in encoded.reports:
                    reports[path].add(report.replaced, report.first_line)
                bytes_done += encoded.num_bytes
                progress.update(bytes_done, writer.num_docs, writer.num_tokens)
        if not writer.num_docs:
            raise DataError(f"{_describe(files)}: empty corpus, no non-empty document to train on; "
                            "add text")
        doc_offsets = np.concatenate([[0], np.cumsum(np.concatenate(writer.lengths))]).astype(np.int64)
        with open(docs_tmp, "wb") as f:
            np.save(f, doc_offsets)
        os.replace(tokens_tmp, tokens_path)
        os.replace(docs_tmp, docs_path)
    finally:  # after an error; after success both were renamed away
        tokens_tmp.unlink(missing_ok=True)
        docs_tmp.unlink(missing_ok=True)

    invalid_utf8 = sum(report.replaced for report in reports.values())
    meta = {"version": CACHE_VERSION, "key": key, "tokenizer": tokenizer.fingerprint,
            "tokenizer_kind": tokenizer.kind, "num_tokens": writer.num_tokens, "num_docs": writer.num_docs,
            "max_token_id": writer.max_token_id, "invalid_utf8": invalid_utf8, "files": stats}
    meta_tmp = meta_path.with_name(meta_path.name + tmp)
    meta_tmp.write_text(json.dumps(meta))
    os.replace(meta_tmp, meta_path)  # written last: it marks the cache complete

    progress.finish(_summary("tokenized", len(files), writer.num_docs, writer.num_tokens, progress, workers,
                             meta_path))
    for path, report in reports.items():
        if report.replaced:
            _log(f"warning: {path}:{report.first_line}: {report.replaced} invalid UTF-8 "
                 "byte sequence(s) replaced with U+FFFD")
    tokens = np.memmap(tokens_path, dtype="<u4", mode="r")
    doc_offsets = np.load(docs_path, mmap_mode="r")  # as a cache hit sees it
    return TokenCache(tokens, doc_offsets, files, meta_path, hit=False, invalid_utf8=invalid_utf8,
                      max_token_id=writer.max_token_id)


def _summary(verb: str, num_files: int, num_docs: int, num_tokens: int, progress: Progress, workers: int,
             meta_path: Path) -> str:
    """The one line that ends a build."""
    seconds = time.perf_counter() - progress.start
    return (f"{verb} {num_files} files: {num_docs:,} {progress.unit}, {num_tokens:,} tokens in {seconds:.1f}s "
            f"({num_tokens / max(seconds, 1e-9):,.0f} tokens/s, {workers} worker{'s' * (workers != 1)}) "
            f"-> {meta_path}")


# ---------------------------------------------------------------------------
# Packed windows and data-parallel batches


def micro_batch_size(global_batch: int, dp_size: int, grad_accum: int = 1) -> int:
    """Samples per rank per micro-step: global_batch / (dp_size * grad_accum)."""
    if global_batch < 1 or dp_size < 1 or grad_accum < 1:
        raise DataError(f"global batch {global_batch}, dp_size {dp_size} and grad_accum {grad_accum} "
                        "must all be >= 1")
    per_step = dp_size * grad_accum
    if global_batch % per_step:
        lower, upper = global_batch // per_step * per_step, (global_batch // per_step + 1) * per_step
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise DataError(f"global batch {global_batch} is not divisible by dp_size {dp_size} x "
                        f"grad_accum {grad_accum} = {per_step}: use a global batch of {nearest}")
    return global_batch // per_step


class Batch(NamedTuple):
    """One rank's micro-batch, int64 [micro_batch, seq_len] tensors."""

    inputs: torch.Tensor
    targets: torch.Tensor  # IGNORE_INDEX where the loss does not apply
    document_ids: Optional[torch.Tensor]  # non-decreasing per row from 0; None without document masking


Row = tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]  # one sample's inputs, targets, document ids


_MASK64 = (1 << 64) - 1


class Permutation:
    """A seeded pseudo-random permutation of range(n), evaluated one index at a time
    in O(1) memory, so the order of 10**12 windows costs what the order of 10 does.

    A balanced Feistel network over the smallest even number of bits covering n is a
    bijection of [0, 4**k) whatever its round function (here splitmix64's finalizer of
    the right half xor a round key). An index that lands at or past n goes through the
    network again ("cycle walking") until it lands inside, which keeps the map a
    bijection of [0, n); the domain is under 4n, so a lookup averages under 4 passes
    (3-15 us in Python). The round keys come from numpy's SeedSequence of (seed, epoch):
    every rank derives the same order, and (seed, epoch) pairs do not collide as
    seed + epoch would.
    """

    ROUNDS = 6  # 4 already make a good pseudo-random permutation (Luby-Rackoff); 2 more are cheap

    def __init__(self, n: int, seed: int, epoch: int = 0):
        if n < 1:
            raise DataError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        self.half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)  # bits per Feistel half
        self.keys = [int(k) for k in np.random.SeedSequence([seed, epoch]).generate_state(self.ROUNDS, np.uint64)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} is outside the permutation of range({self.n})")
        i = self._encrypt(i)
        while i >= self.n:
            i = self._encrypt(i)
        return i

    def _encrypt(self, x: int) -> int:
        half, mask = self.half, (1 << self.half) - 1
        left, right = x >> half, x & mask
        for key in self.keys:  # the finalizer inlined: this loop is the per-sample cost
            z = ((right ^ key) + 0x9E3779B97F4A7C15) & _MASK64
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
            left, right = right, left ^ ((z ^ (z >> 31)) & mask)
        return (left << half) | right


class WindowDataset(ABC):
    """Windows of seq_len + 1 tokens in a seeded order per epoch: what the loader needs.

    Sample g (a global sample index, counting across epochs) is window
    Permutation(num_samples, seed, epoch)[g % num_samples] of epoch g // num_samples:
    every window once per epoch, the same order on every rank, in O(1) memory.
    Subclasses set seq_len, seed, name and num_samples and build one window's row.
    """

    seq_len: int
    seed: int
    name: str
    num_samples: int  # windows per epoch

    def __init__(self):
        self._orders: dict[int, Permutation] = {}  # epoch -> window order

    @abstractmethod
    def row(self, window: int) -> Row:
        """(inputs, targets, document ids or None) of one window, each [seq_len]."""

    @abstractmethod
    def num_targets(self, sample: int) -> int:
        """Targets the loss applies to in global sample `sample` (not IGNORE_INDEX); O(1)."""

    def window_index(self, sample: int) -> int:
        """Which window (of its epoch) global sample `sample` is."""
        epoch, i = divmod(sample, self.num_samples)
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # only the current and next epoch are ever needed
                self._orders.pop(min(self._orders))
            self._orders[epoch] = Permutation(self.num_samples, self.seed, epoch)
        return self._orders[epoch][i]

    def get_batch(self, first_sample: int, dp_rank: int, dp_size: int, micro_batch: int) -> Batch:
        """dp rank `dp_rank`'s slice of the micro_batch * dp_size samples starting
        at global sample `first_sample`."""
        self._check_layout(dp_rank, dp_size, micro_batch)
        first = first_sample + dp_rank * micro_batch
        return self._batch([first + j for j in range(micro_batch)])

    def _batch(self, samples: Sequence[int]) -> Batch:
        rows = [self.row(self.window_index(s)) for s in samples]
        inputs, targets, doc_ids = (np.stack(column) if column[0] is not None else None
                                    for column in zip(*rows))
        return Batch(*(torch.from_numpy(a.astype(np.int64)) if a is not None else None
                       for a in (inputs, targets, doc_ids)))

    def batches(self, dp_rank: int, dp_size: int, micro_batch: int,
                start_sample: int = 0) -> Iterator[Batch]:
        """Endless micro-batches for one dp rank, from global sample `start_sample` on."""
        self._check_layout(dp_rank, dp_size, micro_batch)
        self.check_fits(micro_batch * dp_size)
        if start_sample < 0:
            raise DataError(f"start_sample must be >= 0, got {start_sample}")
        sample = start_sample
        while True:
            yield self.get_batch(sample, dp_rank, dp_size, micro_batch)
            sample += micro_batch * dp_size

    def check_fits(self, global_batch: int) -> None:
        if self.num_samples < global_batch:
            raise DataError(
                f"{self.name}: corpus has {self.num_samples:,} windows of seq_len + 1 = {self.seq_len + 1} "
                f"tokens ({self.num_tokens:,} tokens), fewer than one global batch of {global_batch}; "
                "add text, or lower seq_len or the batch size")

    @staticmethod
    def _check_layout(dp_rank: int, dp_size: int, micro_batch: int) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside 0..dp_size-1 for dp_size {dp_size}")
        if micro_batch < 1:
            raise DataError(f"micro_batch must be >= 1, got {micro_batch}")


def _check_documents(documents, num_docs: int, name: str) -> np.ndarray:
    documents = np.asarray(documents, dtype=np.int64)
    if documents.ndim != 1 or len(documents) == 0:
        raise DataError(f"{name}: documents= must be a non-empty 1-D index array, got shape {documents.shape}")
    if documents.min() < 0 or documents.max() >= num_docs:
        raise DataError(f"{name}: documents= holds indices outside 0..{num_docs - 1}; "
                        "build the index from this corpus's own document count")
    return documents


def _non_decreasing(a: np.ndarray, block: int = 1 << 22) -> bool:
    """Checked a block at a time: np.diff of a mapped 1B-document index would be an 8 GB copy."""
    return all((np.diff(a[i:i + block + 1]) >= 0).all() for i in range(0, max(len(a) - 1, 1), block))


class PackedDataset(WindowDataset):
    """Pretraining windows: stride seq_len over the token stream of all (or the
    selected) documents, documents running across window boundaries.

    `source` is a TokenCache or any 1-D token array; a plain array is one
    document unless `doc_offsets` ([num_docs + 1], as in TokenCache) is given.
    """

    def __init__(self, source: TokenCache | np.ndarray, seq_len: int, seed: int = 0, *,
                 document_masking: bool = False, doc_offsets: np.ndarray | None = None,
                 documents: np.ndarray | None = None):
        super().__init__()
        self.tokens = source.tokens if isinstance(source, TokenCache) else np.asarray(source)
        self.name = source.describe() if isinstance(source, TokenCache) else "token array"
        if isinstance(source, TokenCache):
            doc_offsets = source.doc_offsets
        elif doc_offsets is None:
            doc_offsets = np.array([0, len(self.tokens)])
        doc_offsets = np.asarray(doc_offsets, dtype=np.int64)  # a mapped index stays mapped
        if doc_offsets[0] != 0 or doc_offsets[-1] != len(self.tokens) or not _non_decreasing(doc_offsets):
            raise DataError(f"{self.name}: doc_offsets must rise from 0 to the token count "
                            f"{len(self.tokens)}, got {doc_offsets[0]}..{doc_offsets[-1]}")
        self.seq_len, self.seed, self.document_masking = seq_len, seed, document_masking
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        if documents is None:
            self._doc_starts = None  # the stream is the token array itself
            self._cum = doc_offsets
        else:
            # A virtual concatenation of the selected documents: cumulative
            # lengths map stream positions to documents without copying tokens.
            documents = _check_documents(documents, len(doc_offsets) - 1, self.name)
            self._doc_starts = doc_offsets[documents]
            lengths = doc_offsets[documents + 1] - self._doc_starts
            self._cum = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.num_tokens = int(self._cum[-1])
        self.num_samples = max(0, (self.num_tokens - 1) // seq_len)
        if self.num_samples == 0:
            raise DataError(f"{self.name}: corpus of {self.num_tokens:,} tokens is smaller than one "
                            f"window of seq_len + 1 = {seq_len + 1} tokens; add text or lower seq_len")

    def window(self, sample: int) -> np.ndarray:
        """The seq_len + 1 tokens of global sample `sample`."""
        start = self.window_index(sample) * self.seq_len
        return self._tokens(start, start + self.seq_len + 1)

    def _tokens(self, start: int, stop: int) -> np.ndarray:
        if self._doc_starts is None:
            return self.tokens[start:stop]
        first, last = np.searchsorted(self._cum, [start, stop - 1], side="right") - 1
        pieces = []
        for d in range(first, last + 1):
            a, b = max(start, self._cum[d]), min(stop, self._cum[d + 1])
            offset = self._doc_starts[d] - self._cum[d]
            pieces.append(self.tokens[offset + a:offset + b])
        return np.concatenate(pieces)

    def row(self, window: int) -> Row:
        start = window * self.seq_len
        tokens = self._tokens(start, start + self.seq_len + 1).astype(np.int64)
        doc_ids = None
        if self.document_masking:
            # side="right" skips empty documents; ids are relative to the window's first token
            doc = np.searchsorted(self._cum, np.arange(start, start + self.seq_len), side="right") - 1
            doc_ids = doc - doc[0]
        return tokens[:-1], tokens[1:], doc_ids

    def num_targets(self, sample: int) -> int:
        return self.seq_len  # pretraining: every target counts


class DistributedDataLoader:
    """One dp rank's endless stream of micro-batches; its state is the global
    sample counter, identical on every rank, so any rank's state_dict resumes all.

    Each `next()` is one micro-step: the global counter advances by
    micro_batch * dp_size; grad_accum micro-steps make one optimizer step of
    `global_batch` samples.
    """

    def __init__(self, dataset: WindowDataset, *, global_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, grad_accum: int = 1):
        self.dataset = dataset
        self.micro_batch = micro_batch_size(global_batch, dp_size, grad_accum)
        dataset._check_layout(dp_rank, dp_size, self.micro_batch)
        dataset.check_fits(global_batch)
        self.global_batch, self.grad_accum = global_batch, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.sample = 0  # global samples consumed so far

    @property
    def epoch(self) -> int:
        return self.sample // self.dataset.num_samples

    def __iter__(self) -> "DistributedDataLoader":
        return self

    def __next__(self) -> Batch:
        batch = self.dataset.get_batch(self.sample, self.dp_rank, self.dp_size, self.micro_batch)
        self.sample += self.micro_batch * self.dp_size
        return batch

    def step_target_tokens(self) -> int:
        """Targets the loss applies to in the next optimizer step, over all dp
        ranks and micro-steps: the divisor of an exact mean loss. Every rank
        knows every sample's count, so no collective is needed."""
        return sum(self.dataset.num_targets(s) for s in range(self.sample, self.sample + self.global_batch))

    def state_dict(self) -> dict:
        d = self.dataset
        return {"sample": self.sample, "seq_len": d.seq_len, "seed": d.seed, "num_samples": d.num_samples}

    def load_state_dict(self, state: dict) -> None:
        d = self.dataset
        saved = (state["seq_len"], state["seed"], state["num_samples"])
        if saved != (d.seq_len, d.seed, d.num_samples):
            raise DataError(
                f"checkpoint data state has seq_len={saved[0]}, seed={saved[1]}, {saved[2]} windows; this run "
                f"has seq_len={d.seq_len}, seed={d.seed}, {d.num_samples} windows of {d.name}: resume with "
                "the same data, seq_len and seed, or drop the data state to restart the data order")
        self.sample = int(state["sample"])


# ---------------------------------------------------------------------------
# Validation


def split_documents(num_docs: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted document indices: ceil(fraction * num_docs) whole
    documents held out at random, the same for a given seed on any mesh."""
    if not 0 < fraction < 1:
        raise DataError(f"validation fraction must be between 0 and 1 (exclusive), got {fraction}")
    num_val = int(np.ceil(fraction * num_docs))
    if num_docs < 2 or num_val >= num_docs:
        raise DataError(f"validation fraction {fraction} of {num_docs} documents leaves no document "
                        "to train on; lower the fraction or add documents")
    # Its own stream: the window orders use SeedSequence([seed, epoch]).
    order = np.random.default_rng([seed, 0x5EED]).permutation(num_docs)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def eval_batches(dataset: WindowDataset, num_batches: int, global_batch: int, dp_rank: int,
                 dp_size: int, micro_batch: int) -> Iterator[Batch]:
    """This rank's micro-batches over a fixed set of samples: the first
    num_batches * global_batch samples of epoch 0's order (capped at whole
    global batches within one epoch). The set does not depend on the mesh, so
    the summed loss over it, divided by its target count, is the same on any."""
    dataset._check_layout(dp_rank, dp_size, micro_batch)
    if num_batches < 1:
        raise DataError(f"eval batches must be >= 1, got {num_batches}")
    usable = dataset.num_samples // global_batch
    if usable == 0:
        raise DataError(f"{dataset.name}: validation set has {dataset.num_samples} windows, fewer than one "
                        f"global batch of {global_batch}; hold out more data or lower the batch size")
    if usable < num_batches:
        _log(f"warning: {dataset.name}: validation set has {dataset.num_samples} windows, enough for "
             f"{usable} of the {num_batches} eval batches of {global_batch}; evaluating on {usable}")
    per_micro_step = micro_batch * dp_size
    if global_batch % per_micro_step:
        raise DataError(f"eval global batch {global_batch} is not a multiple of micro_batch {micro_batch} x "
                        f"dp_size {dp_size}")
    for first in range(0, min(usable, num_batches) * global_batch, per_micro_step):
        yield dataset.get_batch(first, dp_rank, dp_size, micro_batch)


# ---------------------------------------------------------------------------
# Tokenizing ahead of training: python -m llama.data prepare


PREPARE_DESCRIPTION = """\
Tokenize a corpus ahead of training, on every core, into exactly the cache that
train.py opens for the same --data, --tokenizer, --cache-dir, --data-format,
--train-on, --skip-bad-lines and --val-data: train.py then starts without
tokenizing. Chat and instruction .jsonl data go to the conversation cache, as in
train.py. The cache is the same byte for byte whatever the number of workers.

  python -m llama.data prepare --data corpus/ --tokenizer tokenizer.model
"""


def prepare(data: Sequence[PathLike] | None, tokenizer: Tokenizer, cache_dir: PathLike | None = None, *,
            data_format: str = "auto", train_on: str = "assistant", skip_bad_lines: bool = False,
            val_data: Sequence[PathLike] | None = None, workers: int = 1, quiet: bool = False) -> list:
    """The caches train.py's build_data opens for the same settings, built if missing:
    [train cache] or [train cache, validation cache]. Each worker uses one core."""
    from llama.chat import is_chat_data, load_conversation_cache

    sources = data or default_corpus_paths()
    chat = is_chat_data(sources, data_format)  # as in train.py: the training data decides for both
    caches = []
    for paths in [sources] + ([val_data] if val_data else []):
        if chat:
            caches.append(load_conversation_cache(
                paths, tokenizer, cache_dir, data_format=data_format, train_on=train_on,
                skip_bad_lines=skip_bad_lines, quiet=quiet, workers=workers))
        else:
            caches.append(load_token_cache(paths, tokenizer, cache_dir, quiet=quiet, workers=workers,
                                           num_threads=1))
    return caches


def main(argv: Sequence[str] | None = None) -> int:
    from llama.chat import DATA_FORMATS, TRAIN_ON

    parser = argparse.ArgumentParser(prog="python -m llama.data", description="Data tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("prepare", help="tokenize a corpus into the cache train.py reads",
                            description=PREPARE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="*", metavar="PATH",
                   help="text / .jsonl files or directories, as given to train.py (default: Python's stdlib sources)")
    p.add_argument("--tokenizer", default="bytes",
                   help="tokenizer.model (Llama 3 or 2) or 'bytes', as given to train.py (default: %(default)s)")
    p.add_argument("--cache-dir", help="token cache directory (default: .token_cache next to the data)")
    p.add_argument("--data-format", default="auto", choices=DATA_FORMATS,
                   help=".jsonl format: chat messages, alpaca, prompt-completion or text (default: detected per file)")
    p.add_argument("--train-on", default="assistant", choices=TRAIN_ON,
                   help="chat data: which tokens the loss applies to (default: %(default)s)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="count and report bad .jsonl lines instead of stopping (default: stop)")
    p.add_argument("--val-data", nargs="*", metavar="PATH",
                   help="held-out files or directories, as given to train.py (default: none)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes tokenizing in parallel, one core each (default: %(default)s, the cores "
                        "this process may use)")
    opts = parser.parse_args(argv)
    if opts.workers < 1:
        p.error(f"--workers must be >= 1, got {opts.workers}")
    try:
        prepare(opts.data, load_tokenizer(opts.tokenizer), opts.cache_dir, data_format=opts.data_format,
                train_on=opts.train_on, skip_bad_lines=opts.skip_bad_lines, val_data=opts.val_data,
                workers=opts.workers)
    except (DataError, TokenizerFileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: no cache was written for the data being tokenized", file=sys.stderr, flush=True)
        return 130
    return 0


def __getattr__(name: str):
    # Chat data lives in llama/chat.py, which imports this module; importing it
    # lazily lets `from llama.data import encode_conversation` work either way round.
    if name in _CHAT_EXPORTS:
        from llama import chat
        return getattr(chat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_CHAT_EXPORTS = ("encode_conversation", "ChatDataset", "ConversationCache", "load_conversation_cache",
                 "is_chat_data", "detect_data_format", "DATA_FORMATS", "TRAIN_ON")


if __name__ == "__main__":
    # Run the copy of this module that llama.chat imports, not this __main__ one,
    # so DataError and friends are one class each.
    from llama.data import main as _main

    sys.exit(_main())
