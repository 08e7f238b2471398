"""Pre-training data: a token cache on disk, packed windows, data-parallel batches.

1. `load_token_cache(sources, tokenizer)` tokenizes text files, `.jsonl` files
   (a "text" field per line) or directories of them once, into a uint32 memmap
   of all tokens plus an index of document offsets. Each document is framed as
   BOS + tokens + EOS. Later runs reuse the cache while the source files (paths
   and the sha256 of their bytes) and the tokenizer (its fingerprint) are
   unchanged.
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

import hashlib
import json
import os
import sys
import sysconfig
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from llama.tokenizer import Tokenizer

PathLike = Union[str, os.PathLike]
Sources = Union[PathLike, Sequence[PathLike]]

CACHE_VERSION = 2  # 2: keyed on the sha256 of the files' bytes instead of size and mtime
HASH_CHUNK_BYTES = 16 << 20
IGNORE_INDEX = -100  # a target the loss skips (torch.nn.functional.cross_entropy's default)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")  # one file = one document
JSONL_SUFFIXES = (".jsonl",)  # one line = one document, its "text" field
ENCODE_BATCH_CHARS = 8_000_000  # text handed to the tokenizer's threads at once

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
            raise DataError(f"{source}: no such data file or directory")
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
    """What reading one file saw: bytes, and invalid UTF-8 for its warning line."""

    replaced: int = 0
    first_line: int = 0
    bytes_read: int = 0

    def add(self, replaced: int, line: int) -> None:
        if replaced and not self.replaced:
            self.first_line = line
        self.replaced += replaced


def _read_documents(path: Path, report: _FileReport) -> Iterator[str]:
    """The non-empty documents of one data file."""
    if path.suffix in JSONL_SUFFIXES:
        yield from _read_jsonl(path, report)
        return
    raw = path.read_bytes()
    text, replaced, line = _decode_utf8(raw)
    report.add(replaced, line)
    report.bytes_read += len(raw)
    if text.strip():
        yield text


def _read_jsonl(path: Path, report: _FileReport) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            report.bytes_read += len(raw)
            if not raw.strip():
                continue
            line, replaced, _ = _decode_utf8(raw)
            report.add(replaced, lineno)
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
                     quiet: bool = False, num_threads: int | None = None,
                     progress_every_mb: float = 16.0) -> TokenCache:
    """Tokenize `sources` into a cache, or open the cache a previous run left.

    The cache is reused while the source files (resolved paths and the sha256
    of their bytes) and `tokenizer.fingerprint` are unchanged; otherwise it is rebuilt in place.
    Files are written under temporary names and renamed, so an interrupted or
    concurrent build never leaves a cache that looks valid but is not. In a
    multi-process run, call it on one rank first, then barrier, then on all.
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
    return _build_cache(files, stats, tokenizer, meta_path, key, quiet=quiet,
                        num_threads=num_threads, progress_every_mb=progress_every_mb)


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
                      invalid_utf8=meta.get("invalid_utf8", 0))


class _TokenWriter:
    """Appends documents' tokens to the cache file. One batch is encoded in the
    background while the caller reads the next, so file reading overlaps encoding."""

    def __init__(self, out, tokenizer: Tokenizer, num_threads: int | None):
        self.out, self.tokenizer, self.num_threads = out, tokenizer, num_threads
        self.doc_lengths: list[int] = []
        self.num_tokens = 0
        self._pool = ThreadPoolExecutor(1)
        self._in_flight: Future | None = None

    def submit(self, texts: list[str]) -> None:
        self._write_in_flight()
        self._in_flight = self._pool.submit(self.tokenizer.encode_batch, texts, bos=True, eos=True,
                                            num_threads=self.num_threads)

    def _write_in_flight(self) -> None:
        if self._in_flight is None:
            return
        for ids in self._in_flight.result():
            self.out.write(ids.astype("<u4", copy=False).tobytes())
            self.doc_lengths.append(len(ids))
            self.num_tokens += len(ids)
        self._in_flight = None

    def __enter__(self) -> "_TokenWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self._write_in_flight()
        finally:
            self._pool.shutdown(cancel_futures=True)


def _build_cache(files: list[Path], stats: list, tokenizer: Tokenizer, meta_path: Path, key: str, *,
                 quiet: bool, num_threads: int | None, progress_every_mb: float) -> TokenCache:
    tokens_path, docs_path = _cache_paths(meta_path)
    meta_path.unlink(missing_ok=True)  # the old cache is invalid from now on
    tmp = f".tmp{os.getpid()}"
    tokens_tmp = tokens_path.with_name(tokens_path.name + tmp)
    docs_tmp = docs_path.with_name(docs_path.name + tmp)
    total_bytes = sum(size for _, size, _ in stats)
    pending: list[str] = []
    pending_chars = bytes_done = invalid_utf8 = 0
    next_report = progress_every_mb * 1e6
    # Tokenize in batches: big enough to keep all threads busy, small enough
    # for a progress line every progress_every_mb.
    batch_chars = max(1, min(ENCODE_BATCH_CHARS, int(progress_every_mb * 1e6)))
    start = time.perf_counter()

    try:
        with open(tokens_tmp, "wb") as out, _TokenWriter(out, tokenizer, num_threads) as writer:
            for i, path in enumerate(files):
                report = _FileReport()
                for text in _read_documents(path, report):
                    pending.append(text)
                    pending_chars += len(text)
                    if pending_chars >= batch_chars:
                        writer.submit(pending)
                        pending, pending_chars = [], 0
                        done = bytes_done + report.bytes_read
                        if not quiet and done >= next_report:
                            rate = done / 1e6 / max(time.perf_counter() - start, 1e-9)
                            _log(f"tokenizing: {done / 1e6:.1f}/{total_bytes / 1e6:.1f} MB, "
                                 f"{writer.num_tokens:,} tokens, {rate:.1f} MB/s, file {i + 1}/{len(files)}")
                            next_report = done + progress_every_mb * 1e6
                bytes_done += report.bytes_read
                if report.replaced:
                    invalid_utf8 += report.replaced
                    _log(f"warning: {path}:{report.first_line}: {report.replaced} invalid UTF-8 "
                         "byte sequence(s) replaced with U+FFFD")
            if pending:
                writer.submit(pending)
        doc_lengths, num_tokens = writer.doc_lengths, writer.num_tokens
        if not doc_lengths:
            raise DataError(f"{_describe(files)}: empty corpus, no non-empty document to train on; "
                            "add text")
        doc_offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
        with open(docs_tmp, "wb") as f:
            np.save(f, doc_offsets)
        os.replace(tokens_tmp, tokens_path)
        os.replace(docs_tmp, docs_path)
    finally:  # after an error; after success both were renamed away
        tokens_tmp.unlink(missing_ok=True)
        docs_tmp.unlink(missing_ok=True)

    meta = {"version": CACHE_VERSION, "key": key, "tokenizer": tokenizer.fingerprint,
            "tokenizer_kind": tokenizer.kind, "num_tokens": num_tokens, "num_docs": len(doc_lengths),
            "invalid_utf8": invalid_utf8, "files": stats}
    meta_tmp = meta_path.with_name(meta_path.name + tmp)
    meta_tmp.write_text(json.dumps(meta))
    os.replace(meta_tmp, meta_path)  # written last: it marks the cache complete

    if not quiet:
        seconds = time.perf_counter() - start
        _log(f"tokenized {len(files)} files, {len(doc_lengths):,} documents, {num_tokens:,} tokens "
             f"in {seconds:.1f}s ({total_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s) -> {tokens_path}")
    tokens = np.memmap(tokens_path, dtype="<u4", mode="r")
    doc_offsets = np.load(docs_path, mmap_mode="r")  # as a cache hit sees it
    return TokenCache(tokens, doc_offsets, files, meta_path, hit=False, invalid_utf8=invalid_utf8)


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


def __getattr__(name: str):
    # Chat data lives in llama/chat.py, which imports this module; importing it
    # lazily lets `from llama.data import encode_conversation` work either way round.
    if name in _CHAT_EXPORTS:
        from llama import chat
        return getattr(chat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_CHAT_EXPORTS = ("encode_conversation", "ChatDataset", "ConversationCache", "load_conversation_cache",
                 "is_chat_data", "detect_data_format", "DATA_FORMATS", "TRAIN_ON")
