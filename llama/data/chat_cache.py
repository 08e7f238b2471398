"""The conversation cache: chat and instruction data encoded once, with a loss mask per token.

The cache (tokens, a one-byte loss mask per token, int64 offsets; its largest
token id in the description) is keyed on the sha256 of the source files' bytes,
the tokenizer's fingerprint, the data format and train_on; like the token cache
(llama/data/token_cache.py) it is written under temporary names and renamed, so
build it on one rank, barrier, then open it on all. It is built in `workers`
worker processes when asked, the same bytes as in one. The pair cache
(llama/data/pair_cache.py) is stored the same way, built by the same
`build_conversation_cache`, two sequences a pair.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from llama.data.chat import SkipReport, check_train_on, detect_data_format, part_conversations
from llama.data.errors import DataError, log
from llama.data.files import FilePart, PathLike, Sources, chunks_of_parts, find_source_files, read_parts
from llama.data.progress import Progress, build_summary
from llama.data.token_cache import (
    default_cache_dir, describe_files, largest_token_id, open_built_cache, sha256_hex, source_stats)
from llama.data.windows import IGNORE_INDEX
from llama.data.workers import map_in_order, useful_workers
from llama.tokenizer import Tokenizer

CHAT_CACHE_VERSION = 2  # 2: records max_token_id


@dataclass
class EncodedConversations:
    """One chunk's conversations, encoded: what a worker sends back."""

    tokens: np.ndarray  # uint32, the conversations back to back
    mask: np.ndarray  # uint8, 1 where the label is the token
    lengths: np.ndarray  # int64, tokens per conversation
    skips: list[tuple[Path, SkipReport]]  # per part: the bad lines skipped
    num_bytes: int  # of the files' bytes


def encode_chat_chunk(tokenizer: Tokenizer, chunk: list[FilePart], train_on: str,
                      skip_bad_lines: bool) -> EncodedConversations:
    sequences, skips = [], []
    for part in chunk:
        skip = SkipReport() if skip_bad_lines else None
        sequences += part_conversations(part, tokenizer, train_on, skip)
        if skip is not None:
            skips.append((part.path, skip))
    return encoded_sequences(sequences, skips, chunk)


def encoded_sequences(sequences: list[tuple[list[int], list[int]]], skips: list[tuple[Path, SkipReport]],
                      chunk: list[FilePart]) -> EncodedConversations:
    """(ids, labels) sequences as the arrays the cache stores."""
    ids = [np.asarray(sequence_ids, dtype=np.int64) for sequence_ids, _ in sequences]
    labels = [np.asarray(sequence_labels, dtype=np.int64) for _, sequence_labels in sequences]
    tokens = np.concatenate(ids).astype(np.uint32) if ids else np.empty(0, np.uint32)
    mask = (np.concatenate(labels) != IGNORE_INDEX).astype(np.uint8) if labels else np.empty(0, np.uint8)
    return EncodedConversations(tokens, mask, np.array([len(i) for i in ids], dtype=np.int64), skips,
                                sum(len(part.data) for part in chunk))


@dataclass
class ConversationCache:
    """All conversations' tokens back to back, with a loss mask per token."""

    tokens: np.ndarray  # uint32 memmap, read-only
    mask: np.ndarray  # uint8 memmap: 1 where the label is the token, 0 where it is IGNORE_INDEX
    offsets: np.ndarray  # int64 [num_conversations + 1]
    files: list[Path]
    path: Path  # the .json description; .tokens.u32, .mask.u8 and .offsets.npy sit next to it
    hit: bool
    pad_id: int  # the token id of padding (any valid id: its label is IGNORE_INDEX)
    skipped: dict[str, list] = field(default_factory=dict)  # file -> [count, first bad line]
    max_token_id: Optional[int] = None  # the largest id in tokens, recorded when the cache was built
    #                                     (padding adds pad_id, an id of the same tokenizer)

    def __post_init__(self):
        if self.max_token_id is None:  # a cache made in memory: scan it once
            self.max_token_id = largest_token_id(self.tokens)

    @property
    def num_conversations(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_docs(self) -> int:  # the name split_documents' callers use for the pretraining cache
        return self.num_conversations

    def conversation(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, labels) of conversation i, int64."""
        a, b = self.offsets[i], self.offsets[i + 1]
        ids = self.tokens[a:b].astype(np.int64)
        return ids, np.where(self.mask[a:b] != 0, ids, IGNORE_INDEX)

    def describe(self) -> str:
        return describe_files(self.files)


def _chat_cache_paths(meta_path: Path) -> tuple[Path, Path, Path]:
    stem = meta_path.with_suffix("")
    return tuple(stem.with_name(stem.name + suffix) for suffix in (".tokens.u32", ".mask.u8", ".offsets.npy"))


def load_conversation_cache(sources: Sources, tokenizer: Tokenizer, cache_dir: PathLike | None = None, *,
                            data_format: str = "auto", train_on: str = "assistant",
                            skip_bad_lines: bool = False, quiet: bool = False,
                            workers: int = 1) -> ConversationCache:
    """Encode the conversations of `sources` into a cache, or open the one a previous run left.

    Reused while the files' bytes (sha256), the tokenizer, data_format, train_on
    and skip_bad_lines are unchanged. A labels mask, not labels, is stored:
    labels are either the token or IGNORE_INDEX, so one byte per token holds them.
    A build encodes in `workers` processes (1: in this one); the cache is the same either way.
    """
    check_train_on(train_on)
    files = find_source_files(sources)
    formats = [detect_data_format(f, data_format) for f in files]
    for path, fmt in zip(files, formats):
        if fmt == "preference":
            raise DataError(f"{path}: is preference data (prompt/chosen/rejected), not SFT data: train it with "
                            "--objective dpo, or give chat, alpaca or prompt-completion records for SFT")
    stats = source_stats(files)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(sources)
    roots = sources if not isinstance(sources, (str, os.PathLike)) else [sources]
    settings = [data_format, train_on, str(skip_bad_lines)]
    slot = sha256_hex(*(str(Path(r).resolve()) for r in roots), tokenizer.fingerprint, "chat", *settings)[:16]
    key = sha256_hex(str(CHAT_CACHE_VERSION), json.dumps(stats), json.dumps(formats), tokenizer.fingerprint,
                     *settings)
    meta_path = cache_dir / f"{slot}.chat.json"
    cache = read_conversation_cache(meta_path, key, files)
    if cache is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        encode = partial(encode_chat_chunk, train_on=train_on, skip_bad_lines=skip_bad_lines)
        cache = build_conversation_cache(files, formats, stats, tokenizer, meta_path, key, encode,
                                         lambda: {"train_on": train_on}, quiet=quiet, workers=workers)
    elif not quiet:
        log(f"conversation cache hit: {meta_path} ({cache.num_conversations:,} conversations, "
            f"{len(cache.tokens):,} tokens from {len(files)} files)")
    for path, (count, first) in cache.skipped.items():
        log(SkipReport(count, first).line(Path(path)))
    return cache


def open_conversation_cache(meta_path: PathLike, sources: Sources) -> ConversationCache:
    """The cache at `meta_path`, as rank 0 just built or found it, without hashing the
    sources again (see llama.data.token_cache.open_token_cache)."""
    return open_built_cache(meta_path, sources, read_conversation_cache, "conversation cache")


def read_conversation_cache(meta_path: Path, key: str, files: list[Path]) -> ConversationCache | None:
    """The cache at `meta_path` if it is complete and its key is `key`, else None (build it)."""
    tokens_path, mask_path, offsets_path = _chat_cache_paths(meta_path)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or not all(p.is_file() for p in (tokens_path, mask_path, offsets_path)):
        return None
    if tokens_path.stat().st_size != 4 * meta["num_tokens"] or mask_path.stat().st_size != meta["num_tokens"]:
        return None  # truncated by a crash or a full disk: rebuild
    return ConversationCache(np.memmap(tokens_path, dtype="<u4", mode="r"),
                             np.memmap(mask_path, dtype=np.uint8, mode="r"), np.load(offsets_path),
                             files, meta_path, hit=True, pad_id=meta["pad_id"], skipped=meta["skipped"],
                             max_token_id=meta["max_token_id"])


class _ConversationWriter:
    """Appends encoded chunks to the cache's token and mask files, keeping what its description needs."""

    def __init__(self, tokens_out, mask_out):
        self.tokens_out, self.mask_out = tokens_out, mask_out
        self.lengths: list[np.ndarray] = []  # tokens per conversation, a chunk at a time
        self.num_conversations = self.num_tokens = 0
        self.max_token_id = -1

    def write(self, encoded: EncodedConversations) -> None:
        self.tokens_out.write(encoded.tokens.astype("<u4", copy=False).tobytes())
        self.mask_out.write(encoded.mask.tobytes())
        self.lengths.append(encoded.lengths)
        self.num_conversations += len(encoded.lengths)
        self.num_tokens += len(encoded.tokens)
        self.max_token_id = max(self.max_token_id, largest_token_id(encoded.tokens))


def build_conversation_cache(files: list[Path], formats: list[str], stats: list, tokenizer: Tokenizer,
                             meta_path: Path, key: str, encode: Callable, extra_meta: Callable[[], dict], *,
                             quiet: bool, workers: int, unit: str = "conversations", per_item: int = 1,
                             on_chunk: Callable[[EncodedConversations], None] | None = None) -> ConversationCache:
    """Encode `files` into the cache at `meta_path`, `encode(tokenizer, chunk)` giving each
    chunk's EncodedConversations (a picklable function: workers run it). `per_item`
    sequences make one of `unit` in the progress lines (2 for pairs); `on_chunk` sees each
    chunk as it is written, and `extra_meta()`, called after the last, adds to the description."""
    paths = _chat_cache_paths(meta_path)
    meta_path.unlink(missing_ok=True)  # the old cache is invalid from now on
    tmp = f".tmp{os.getpid()}"
    tmps = [p.with_name(p.name + tmp) for p in paths]
    total_bytes = sum(size for _, size, _ in stats)
    progress = Progress("encoding", total_bytes, unit=unit, quiet=quiet)
    workers = useful_workers(workers, total_bytes)
    skips = {path: SkipReport() for path in files}
    chunks = chunks_of_parts(part for path, fmt in zip(files, formats) for part in read_parts(path, fmt))
    bytes_done = 0
    try:
        with open(tmps[0], "wb") as tokens_out, open(tmps[1], "wb") as mask_out:
            writer = _ConversationWriter(tokens_out, mask_out)
            for encoded in map_in_order(encode, tokenizer, chunks, workers):
                writer.write(encoded)
                for path, skip in encoded.skips:
                    skips[path].add(skip)
                if on_chunk is not None:
                    on_chunk(encoded)
                bytes_done += encoded.num_bytes
                progress.update(bytes_done, writer.num_conversations // per_item, writer.num_tokens)
        if not writer.num_conversations:
            raise DataError(f"{describe_files(files)}: empty corpus, no {unit} to train on; add data")
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(writer.lengths))]).astype(np.int64)
        with open(tmps[2], "wb") as f:
            np.save(f, offsets)
        for t, p in zip(tmps, paths):
            os.replace(t, p)
    finally:  # after an error; after success all were renamed away
        for t in tmps:
            t.unlink(missing_ok=True)

    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    skipped = {str(path): [skip.count, skip.first] for path, skip in skips.items() if skip.count}
    meta = {"version": CHAT_CACHE_VERSION, "key": key, "tokenizer": tokenizer.fingerprint,
            "num_tokens": writer.num_tokens, "num_conversations": writer.num_conversations, "pad_id": pad_id,
            "max_token_id": writer.max_token_id, **extra_meta(), "formats": formats, "skipped": skipped}
    meta_tmp = meta_path.with_name(meta_path.name + tmp)
    meta_tmp.write_text(json.dumps(meta))
    os.replace(meta_tmp, meta_path)  # written last: it marks the cache complete
    progress.finish(build_summary("encoded", len(files), writer.num_conversations // per_item, writer.num_tokens,
                                  progress, workers, meta_path))
    return ConversationCache(np.memmap(paths[0], dtype="<u4", mode="r"),
                             np.memmap(paths[1], dtype=np.uint8, mode="r"), offsets, files, meta_path,
                             hit=False, pad_id=pad_id, skipped=skipped, max_token_id=writer.max_token_id)
