"""The pretraining token cache: a corpus tokenized once into a uint32 memmap on disk.

`load_token_cache(sources, tokenizer)` tokenizes text files, `.jsonl` files (a
"text" field per line) or directories of them once, into a uint32 memmap of all
tokens plus an index of document offsets. Each document is framed as BOS +
tokens + EOS. Later runs reuse the cache while the source files (paths and the
sha256 of their bytes) and the tokenizer (its fingerprint) are unchanged. The
cache records its largest token id (`max_token_id`), so a check against the
model's vocabulary needs no scan. Files are read in parts of whole lines,
tokenized in a background thread or in `workers` fresh processes, and written in
corpus order: the same bytes whatever the number of workers. `python -m
llama.data prepare` builds the caches train.py will open, ahead of time and on
every core.

The helpers both caches share live here too: where a cache goes
(`default_cache_dir`), what its key is made of (`source_stats`, `sha256_hex`),
opening the cache another rank built (`open_built_cache`), and `largest_token_id`.
The conversation cache (llama/data/chat_cache.py) is built the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from llama.data.errors import DataError, log
from llama.data.files import (
    FilePart, FileReport, PathLike, Sources, chunks_of_parts, find_source_files, part_documents, read_parts)
from llama.data.progress import Progress, build_summary
from llama.data.workers import map_in_order, useful_workers
from llama.tokenizer import Tokenizer

# 2: keyed on the sha256 of the files' bytes instead of size and mtime; 3: records max_token_id
CACHE_VERSION = 3
HASH_CHUNK_BYTES = 16 << 20


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
        return describe_files(self.files)


def largest_token_id(tokens: np.ndarray, block: int = 1 << 26) -> int:
    """max(tokens), or -1 when empty; blockwise, so a memory-mapped array is not copied whole."""
    return max((int(tokens[i:i + block].max()) for i in range(0, len(tokens), block)), default=-1)


def describe_files(files: list[Path]) -> str:
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


def sha256_hex(*parts: str) -> str:
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
    slot = sha256_hex(*(str(Path(r).resolve()) for r in roots), tokenizer.fingerprint)[:16]
    key = sha256_hex(str(CACHE_VERSION), json.dumps(stats), tokenizer.fingerprint)
    meta_path = cache_dir / f"{slot}.json"

    cache = _open_cache(meta_path, key, files)
    if cache is not None:
        if not quiet:
            log(f"token cache hit: {meta_path} ({cache.num_tokens:,} tokens, "
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
    reports: list[tuple[Path, FileReport]]  # per part: its invalid UTF-8
    num_bytes: int  # of the files' bytes


def encode_text_chunk(tokenizer: Tokenizer, chunk: list[FilePart],
                      num_threads: int | None = None) -> EncodedDocuments:
    texts, reports = [], []
    for part in chunk:
        report = FileReport()
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
    reports = {path: FileReport() for path in files}
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
            raise DataError(f"{describe_files(files)}: empty corpus, no non-empty document to train on; "
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

    progress.finish(build_summary("tokenized", len(files), writer.num_docs, writer.num_tokens, progress,
                                  workers, meta_path))
    for path, report in reports.items():
        if report.replaced:
            log(f"warning: {path}:{report.first_line}: {report.replaced} invalid UTF-8 "
                "byte sequence(s) replaced with U+FFFD")
    tokens = np.memmap(tokens_path, dtype="<u4", mode="r")
    doc_offsets = np.load(docs_path, mmap_mode="r")  # as a cache hit sees it
    return TokenCache(tokens, doc_offsets, files, meta_path, hit=False, invalid_utf8=invalid_utf8,
                      max_token_id=writer.max_token_id)

