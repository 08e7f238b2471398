"""Chat and instruction data: conversations encoded with loss labels, cached, packed whole.

Formats of a `.jsonl` file, one record per line, detected per file from the
keys of its first non-empty line (`data_format` forces one for every file):

    chat               {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    alpaca             {"instruction": "...", "input": "..." (optional), "output": "..."}
                       user turn = instruction, + "\\n\\n" + input when input is non-empty
    prompt-completion  {"prompt": "...", "completion": "..."}: one user turn, one assistant turn
    text               {"text": "..."}: a plain document, BOS + text + EOS, trained on all but BOS

Other files (.txt, .md, ...) are plain text documents, one per file.

A conversation is the Llama 3 chat format without the trailing open header:

    <|begin_of_text|> (<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>)*

and its labels equal the ids where the loss applies, IGNORE_INDEX (-100)
elsewhere. `train_on="assistant"` trains every assistant message's content and
its <|eot_id|> (so the model learns to stop), "last" only the final assistant
message's, "all" everything but BOS.

`ChatDataset` packs whole conversations into windows of seq_len + 1 tokens,
best-fit decreasing by length, once at start-up; the rest of a window is
padding with its own document id. One window of seq_len + 1 = 16 holding two
conversations A (7 tokens) and B (5 tokens), "h" a header token, "c" content:

    tokens        BOS h h c c c eot | BOS h h c eot | pad pad pad pad
    document ids   0  0 0 0 0 0  0  |  1  1 1 1  1  |  2   2   2   2
    labels        -100 . . c c c eot|-100 . . c eot | -100 ...        ("." = -100: user turn or header)

inputs = tokens[:-1], targets = labels[1:], document ids are those of the
inputs. A conversation's BOS has label -100, so the target at the last token
of the previous conversation is never trained, nor is any padding. A
conversation longer than seq_len + 1 tokens is truncated at its end and counted
in `num_truncated`, never dropped.

The conversation cache (tokens, a one-byte loss mask per token, int64
offsets; its largest token id in the description) is keyed on the sha256 of
the source files' bytes, the tokenizer's fingerprint, the data format and
train_on; like the token cache it is written under temporary names and
renamed, so build it on one rank, barrier, then open it on all. It is built in
`workers` worker processes when asked, the same bytes as in one.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from llama.data import (
    IGNORE_INDEX, JSONL_SUFFIXES, DataError, FilePart, open_built_cache, PathLike, Progress, Row, Sources, WindowDataset,
    _check_documents, _describe, _FileReport, _log, _sha256, _summary, chunks_of_parts, default_cache_dir,
    find_source_files, largest_token_id, map_in_order, part_documents, read_parts, source_stats, useful_workers)
from llama.tokenizer import _CHAT_ROLES, Tokenizer, _role_and_content

TRAIN_ON = ("assistant", "last", "all")
DATA_FORMATS = ("auto", "chat", "alpaca", "prompt-completion", "text")
CHAT_CACHE_VERSION = 2  # 2: records max_token_id

_FORMAT_FIX = {
    "chat": 'each line must be {"messages": [{"role": "user", "content": "..."}, '
            '{"role": "assistant", "content": "..."}]}',
    "alpaca": 'each line must be {"instruction": "...", "input": "..." (optional), "output": "..."}',
    "prompt-completion": 'each line must be {"prompt": "...", "completion": "..."}',
    "text": 'each line must be {"text": "..."}',
}


# ---------------------------------------------------------------------------
# One conversation


def encode_conversation(tokenizer: Tokenizer, messages: Iterable,
                        train_on: str = "assistant") -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation in the Llama 3 chat format, no open header at the end.

    A message is a dict {"role", "content"} or an object with those attributes.
    labels[i] == ids[i] where the loss applies, IGNORE_INDEX elsewhere.
    """
    _check_train_on(train_on)
    if "<|eot_id|>" not in tokenizer.special_tokens:
        raise DataError(f"{type(tokenizer).__name__} has no chat special tokens; "
                        "use a Llama 3 or the byte tokenizer for chat data")
    try:
        turns = [_role_and_content(m) for m in messages]
    except ValueError as e:
        raise DataError(str(e)) from None
    if not turns:
        raise DataError("conversation has no messages; give at least one user and one assistant message")
    trained = _trained_turns([role for role, _ in turns], train_on)
    eot = tokenizer.special_tokens["<|eot_id|>"]
    ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    for i, (role, content) in enumerate(turns):
        header = tokenizer._encode_header(role)
        body = tokenizer.encode(content.strip()) + [eot]
        ids += header + body
        labels += [IGNORE_INDEX] * len(header) + (body if i in trained else [IGNORE_INDEX] * len(body))
    if train_on == "all":
        labels = [IGNORE_INDEX] + ids[1:]
    return ids, labels


def _check_train_on(train_on: str) -> None:
    if train_on not in TRAIN_ON:
        raise DataError(f"train_on={train_on!r} is not one of {', '.join(TRAIN_ON)}")


def _trained_turns(roles: list[str], train_on: str) -> set[int]:
    assistant = [i for i, role in enumerate(roles) if role == "assistant"]
    if train_on == "all":
        return set(range(len(roles)))
    if not assistant:
        raise DataError(f"conversation has no assistant message to train on (roles: {', '.join(roles)}); "
                        "add the assistant's reply, or train on all tokens with train_on='all' (--train-on all)")
    return set(assistant) if train_on == "assistant" else {assistant[-1]}


# ---------------------------------------------------------------------------
# Files: formats, records, bad lines


class _BadLine(Exception):
    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


def detect_data_format(path: PathLike, data_format: str = "auto") -> str:
    """The format of one data file: `data_format` unless "auto", else "text" for
    non-.jsonl files, else read from the keys of the first non-empty line."""
    if data_format not in DATA_FORMATS:
        raise DataError(f"data format {data_format!r} is not one of {', '.join(DATA_FORMATS)}")
    path = Path(path)
    if data_format != "auto":
        return data_format
    if path.suffix not in JSONL_SUFFIXES:
        return "text"
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                break
        else:
            return "text"  # empty: the text reader reports an empty corpus if nothing else is there
    try:
        record = json.loads(raw)
    except ValueError:
        raise DataError(f"{path}:{lineno}: not valid JSON, cannot detect the data format; fix the line "
                        "or pass the format (--data-format)") from None
    keys = record if isinstance(record, dict) else {}
    for fmt, key in (("chat", "messages"), ("alpaca", "instruction"), ("prompt-completion", "prompt"),
                     ("text", "text")):
        if key in keys:
            return fmt
    found = ", ".join(list(keys)[:8]) or f"a JSON {type(record).__name__}"
    raise DataError(f"{path}:{lineno}: cannot detect the data format from the keys ({found}); expected "
                    '"messages" (chat), "instruction" (alpaca), "prompt" (prompt-completion) or "text", '
                    "or pass the format (--data-format)")


def is_chat_data(sources: Sources, data_format: str = "auto") -> bool:
    """True when any source file is a conversation format: train on the
    conversation cache and ChatDataset rather than the pretraining token cache."""
    return any(detect_data_format(f, data_format) != "text" for f in find_source_files(sources))


def _messages(record, fmt: str) -> list[dict]:
    """The messages of one parsed record in format `fmt`; _BadLine when malformed."""
    fix = _FORMAT_FIX[fmt]
    if not isinstance(record, dict):
        raise _BadLine(f"expected a JSON object, got a JSON {type(record).__name__}", fix)
    if fmt == "chat":
        return _chat_messages(record, fix)
    if fmt == "alpaca":
        instruction, output = _field(record, "instruction", fix), _field(record, "output", fix)
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise _BadLine(f'"input" is a JSON {type(extra).__name__}, expected a string', fix)
        user = instruction + "\n\n" + extra if extra else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt == "prompt-completion":
        return [{"role": "user", "content": _field(record, "prompt", fix)},
                {"role": "assistant", "content": _field(record, "completion", fix)}]
    raise AssertionError(fmt)


def _field(record: dict, key: str, fix: str) -> str:
    if key not in record:
        raise _BadLine(f'no "{key}" field (keys: {", ".join(list(record)[:8]) or "none"})', fix)
    if not isinstance(record[key], str):
        raise _BadLine(f'"{key}" is a JSON {type(record[key]).__name__}, expected a string', fix)
    return record[key]


def _chat_messages(record: dict, fix: str) -> list[dict]:
    if "messages" not in record:
        raise _BadLine(f'no "messages" field (keys: {", ".join(list(record)[:8]) or "none"})', fix)
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise _BadLine('"messages" must be a non-empty list of {"role", "content"} objects', fix)
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise _BadLine(f"message {i} is a JSON {type(message).__name__}, not an object", fix)
        role, content = message.get("role"), message.get("content")
        if role not in _CHAT_ROLES:
            raise _BadLine(f"message {i} has unknown role {role!r}",
                           f"use one of {', '.join(_CHAT_ROLES)}")
        if not isinstance(content, str):
            raise _BadLine(f'message {i} "content" is a JSON {type(content).__name__}, expected a string',
                           "give the text of the message as a string")
    return messages


@dataclass
class _SkipReport:
    count: int = 0
    first: str = ""  # "line 7: unknown role 'bot'"

    def add(self, other: "_SkipReport") -> None:
        if other.count and not self.count:
            self.first = other.first
        self.count += other.count

    def line(self, path: Path) -> str:
        return f"warning: {path}: skipped {self.count} bad lines (first: {self.first})"


def _part_conversations(part: FilePart, tokenizer: Tokenizer, train_on: str,
                        skip: _SkipReport | None) -> Iterator[tuple[list[int], list[int]]]:
    """(ids, labels) per conversation of one part of a file. A bad line raises DataError
    naming file and line, or is counted in `skip` when skipping."""
    if part.fmt == "text":
        for text in part_documents(part, _FileReport()):
            ids = tokenizer.encode(text, bos=True, eos=True)
            yield ids, [IGNORE_INDEX] + ids[1:]
        return
    for lineno, raw in part.numbered_lines():
        if not raw.strip():
            continue
        try:
            try:
                record = json.loads(raw)
            except ValueError as e:
                raise _BadLine(f"not valid JSON ({getattr(e, 'msg', e)})", _FORMAT_FIX[part.fmt]) from None
            messages = _messages(record, part.fmt)
            try:
                yield encode_conversation(tokenizer, messages, train_on)
            except DataError as e:
                reason, _, fix = str(e).partition("; ")
                raise _BadLine(reason, fix or _FORMAT_FIX[part.fmt]) from None
        except _BadLine as bad:
            if skip is None:
                raise DataError(f"{part.path}:{lineno}: {bad.reason}; {bad.fix}, "
                                "or skip bad lines (--skip-bad-lines)") from None
            if not skip.count:
                skip.first = f"line {lineno}: {bad.reason}"
            skip.count += 1


@dataclass
class EncodedConversations:
    """One chunk's conversations, encoded: what a worker sends back."""

    tokens: np.ndarray  # uint32, the conversations back to back
    mask: np.ndarray  # uint8, 1 where the label is the token
    lengths: np.ndarray  # int64, tokens per conversation
    skips: list[tuple[Path, _SkipReport]]  # per part: the bad lines skipped
    num_bytes: int  # of the files' bytes


def encode_chat_chunk(tokenizer: Tokenizer, chunk: list[FilePart], train_on: str,
                      skip_bad_lines: bool) -> EncodedConversations:
    ids, labels, skips = [], [], []
    for part in chunk:
        skip = _SkipReport() if skip_bad_lines else None
        for conversation_ids, conversation_labels in _part_conversations(part, tokenizer, train_on, skip):
            ids.append(np.asarray(conversation_ids, dtype=np.int64))
            labels.append(np.asarray(conversation_labels, dtype=np.int64))
        if skip is not None:
            skips.append((part.path, skip))
    tokens = np.concatenate(ids).astype(np.uint32) if ids else np.empty(0, np.uint32)
    mask = (np.concatenate(labels) != IGNORE_INDEX).astype(np.uint8) if labels else np.empty(0, np.uint8)
    return EncodedConversations(tokens, mask, np.array([len(i) for i in ids], dtype=np.int64), skips,
                                sum(len(part.data) for part in chunk))


# ---------------------------------------------------------------------------
# Conversation cache


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
        return _describe(self.files)


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
    _check_train_on(train_on)
    files = find_source_files(sources)
    formats = [detect_data_format(f, data_format) for f in files]
    stats = source_stats(files)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(sources)
    roots = sources if not isinstance(sources, (str, os.PathLike)) else [sources]
    settings = [data_format, train_on, str(skip_bad_lines)]
    slot = _sha256(*(str(Path(r).resolve()) for r in roots), tokenizer.fingerprint, "chat", *settings)[:16]
    key = _sha256(str(CHAT_CACHE_VERSION), json.dumps(stats), json.dumps(formats), tokenizer.fingerprint,
                  *settings)
    meta_path = cache_dir / f"{slot}.chat.json"
    cache = _open_chat_cache(meta_path, key, files)
    if cache is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache = _build_chat_cache(files, formats, stats, tokenizer, meta_path, key, train_on, skip_bad_lines,
                                  quiet=quiet, workers=workers)
    elif not quiet:
        _log(f"conversation cache hit: {meta_path} ({cache.num_conversations:,} conversations, "
             f"{len(cache.tokens):,} tokens from {len(files)} files)")
    for path, (count, first) in cache.skipped.items():
        _log(_SkipReport(count, first).line(Path(path)))
    return cache


def open_conversation_cache(meta_path: PathLike, sources: Sources) -> ConversationCache:
    """The cache at `meta_path`, as rank 0 just built or found it, without hashing the
    sources again (see llama.data.open_token_cache)."""
    return open_built_cache(meta_path, sources, _open_chat_cache, "conversation cache")


def _open_chat_cache(meta_path: Path, key: str, files: list[Path]) -> ConversationCache | None:
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


def _build_chat_cache(files: list[Path], formats: list[str], stats: list, tokenizer: Tokenizer,
                      meta_path: Path, key: str, train_on: str, skip_bad_lines: bool, *, quiet: bool,
                      workers: int) -> ConversationCache:
    paths = _chat_cache_paths(meta_path)
    meta_path.unlink(missing_ok=True)  # the old cache is invalid from now on
    tmp = f".tmp{os.getpid()}"
    tmps = [p.with_name(p.name + tmp) for p in paths]
    total_bytes = sum(size for _, size, _ in stats)
    progress = Progress("encoding", total_bytes, unit="conversations", quiet=quiet)
    workers = useful_workers(workers, total_bytes)
    skips = {path: _SkipReport() for path in files}
    chunks = chunks_of_parts(part for path, fmt in zip(files, formats) for part in read_parts(path, fmt))
    encode = partial(encode_chat_chunk, train_on=train_on, skip_bad_lines=skip_bad_lines)
    bytes_done = 0
    try:
        with open(tmps[0], "wb") as tokens_out, open(tmps[1], "wb") as mask_out:
            writer = _ConversationWriter(tokens_out, mask_out)
            for encoded in map_in_order(encode, tokenizer, chunks, workers):
                writer.write(encoded)
                for path, skip in encoded.skips:
                    skips[path].add(skip)
                bytes_done += encoded.num_bytes
                progress.update(bytes_done, writer.num_conversations, writer.num_tokens)
        if not writer.num_conversations:
            raise DataError(f"{_describe(files)}: empty corpus, no conversation to train on; add data")
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
            "max_token_id": writer.max_token_id, "train_on": train_on, "formats": formats, "skipped": skipped}
    meta_tmp = meta_path.with_name(meta_path.name + tmp)
    meta_tmp.write_text(json.dumps(meta))
    os.replace(meta_tmp, meta_path)  # written last: it marks the cache complete
    progress.finish(_summary("encoded", len(files), writer.num_conversations, writer.num_tokens, progress, workers,
                             meta_path))
    return ConversationCache(np.memmap(paths[0], dtype="<u4", mode="r"),
                             np.memmap(paths[1], dtype=np.uint8, mode="r"), offsets, files, meta_path,
                             hit=False, pad_id=pad_id, skipped=skipped, max_token_id=writer.max_token_id)


# ---------------------------------------------------------------------------
# Packing


def pack_windows(lengths: np.ndarray, capacity: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: the longest item first, each into the open window
    with the least room that still fits it, else a new window.

    Returns (items, offsets): window w holds items[offsets[w]:offsets[w + 1]]
    (in increasing index order). The seed only breaks ties between equal
    lengths, so similar items from one file do not always share windows.
    Windows are bucketed by room left, and the distinct rooms (at most
    `capacity`) kept sorted, so each item costs one bisection: O(n log n).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise DataError(f"item lengths must be within 1..{capacity}, got {lengths.min()}..{lengths.max()}")
    order = np.random.default_rng(seed).permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]
    windows_by_room: dict[int, list[int]] = {}
    rooms: list[int] = []  # the keys of windows_by_room, sorted
    window_of = np.empty(len(lengths), dtype=np.int64)
    num_windows = 0
    for item, length in zip(order.tolist(), lengths[order].tolist()):
        k = bisect.bisect_left(rooms, length)
        if k == len(rooms):
            window, room = num_windows, capacity
            num_windows += 1
        else:
            room = rooms[k]
            window = windows_by_room[room].pop()
            if not windows_by_room[room]:
                del windows_by_room[room]
                rooms.pop(k)
        window_of[item] = window
        room -= length
        if room:
            if room not in windows_by_room:
                windows_by_room[room] = []
                bisect.insort(rooms, room)
            windows_by_room[room].append(window)
    items = np.argsort(window_of, kind="stable")
    offsets = np.searchsorted(window_of[items], np.arange(num_windows + 1))
    return items, offsets.astype(np.int64)


class ChatDataset(WindowDataset):
    """Windows of seq_len + 1 tokens holding whole conversations, then padding.

    `documents` (an index array, e.g. from `split_documents`) selects the
    conversations to pack; all by default. Packing depends on the lengths and
    the seed only, never on the mesh.
    """

    def __init__(self, cache: ConversationCache, seq_len: int, seed: int = 0, *,
                 documents: np.ndarray | None = None):
        super().__init__()
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.cache, self.seq_len, self.seed, self.name = cache, seq_len, seed, cache.describe()
        capacity = seq_len + 1
        offsets = cache.offsets
        docs = (np.arange(cache.num_conversations) if documents is None
                else _check_documents(documents, cache.num_conversations, self.name))
        self._starts = offsets[docs]
        full = offsets[docs + 1] - self._starts
        self._lengths = np.minimum(full, capacity)
        self.num_truncated = int((full > capacity).sum())
        targets = np.add.reduceat(cache.mask, offsets[:-1], dtype=np.int64)[docs]
        for i in np.flatnonzero(full > capacity):  # few: count what truncation kept
            targets[i] = np.count_nonzero(cache.mask[self._starts[i]:self._starts[i] + capacity])
        self._items, self._window_offsets = pack_windows(self._lengths, capacity, seed)
        self._window_targets = np.add.reduceat(targets[self._items], self._window_offsets[:-1])
        self.num_samples = len(self._window_offsets) - 1
        self.num_tokens = int(self._lengths.sum())  # real tokens, truncation applied
        self.packing_efficiency = self.num_tokens / (self.num_samples * capacity)

    def conversations(self, window: int) -> np.ndarray:
        """Indices (into `documents`, or the cache) of the conversations in a window."""
        return self._items[self._window_offsets[window]:self._window_offsets[window + 1]]

    def row(self, window: int) -> Row:
        capacity = self.seq_len + 1
        items = self.conversations(window)
        tokens = np.full(capacity, self.cache.pad_id, dtype=np.int64)
        labels = np.full(capacity, IGNORE_INDEX, dtype=np.int64)
        doc_ids = np.full(capacity, len(items), dtype=np.int64)  # padding: one more document
        pos = 0
        for doc, item in enumerate(items.tolist()):
            start, n = self._starts[item], self._lengths[item]
            tokens[pos:pos + n] = self.cache.tokens[start:start + n]
            labels[pos:pos + n] = np.where(self.cache.mask[start:start + n] != 0, tokens[pos:pos + n],
                                           IGNORE_INDEX)
            doc_ids[pos:pos + n] = doc
            pos += n
        return tokens[:-1], labels[1:], doc_ids[:-1]

    def num_targets(self, sample: int) -> int:
        return int(self._window_targets[self.window_index(sample)])
