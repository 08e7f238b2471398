"""Chat and instruction data: file formats, and conversations encoded with loss labels.

Formats of a `.jsonl` file, one record per line, detected per file from the
keys of its first non-empty line (`data_format` forces one for every file):

    chat               {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    alpaca             {"instruction": "...", "input": "..." (optional), "output": "..."}
                       user turn = instruction, + "\\n\\n" + input when input is non-empty
    prompt-completion  {"prompt": "...", "completion": "..."}: one user turn, one assistant turn
    text               {"text": "..."}: a plain document, BOS + text + EOS, trained on all but BOS
    preference         {"prompt", "chosen", "rejected"}: pairs for DPO, read in llama/data/preference.py;
                       detected first (a pair has a "prompt" too), never read as SFT data

Other files (.txt, .md, ...) are plain text documents, one per file.

A conversation is the Llama 3 chat format without the trailing open header:

    <|begin_of_text|> (<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>)*

and its labels equal the ids where the loss applies, IGNORE_INDEX (-100)
elsewhere. `train_on="assistant"` trains every assistant message's content and
its <|eot_id|> (so the model learns to stop), "last" only the final assistant
message's, "all" everything but BOS.

A bad line raises DataError naming the file and the line, or with
skip_bad_lines is counted in a `SkipReport`, for a warning line. The
conversation cache is in llama/data/chat_cache.py, packing in
llama/data/chat_packing.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from llama.data.errors import DataError
from llama.data.files import (
    JSONL_SUFFIXES, FilePart, FileReport, PathLike, Sources, find_source_files, part_documents)
from llama.data.windows import IGNORE_INDEX
from llama.tokenizer import CHAT_ROLES, Tokenizer, role_and_content

TRAIN_ON = ("assistant", "last", "all")
DATA_FORMATS = ("auto", "chat", "alpaca", "prompt-completion", "text", "preference")

FORMAT_FIX = {
    "chat": 'each line must be {"messages": [{"role": "user", "content": "..."}, '
            '{"role": "assistant", "content": "..."}]}',
    "alpaca": 'each line must be {"instruction": "...", "input": "..." (optional), "output": "..."}',
    "prompt-completion": 'each line must be {"prompt": "...", "completion": "..."}',
    "text": 'each line must be {"text": "..."}',
    "preference": 'each line must be {"prompt": "...", "chosen": "...", "rejected": "..."}, or "prompt" a list '
                  'of {"role", "content"} messages and "chosen"/"rejected" the assistant reply',
}


# ---------------------------------------------------------------------------
# One conversation


def encode_conversation(tokenizer: Tokenizer, messages: Iterable,
                        train_on: str = "assistant") -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation in the Llama 3 chat format, no open header at the end.

    A message is a dict {"role", "content"} or an object with those attributes.
    labels[i] == ids[i] where the loss applies, IGNORE_INDEX elsewhere.
    """
    check_train_on(train_on)
    if "<|eot_id|>" not in tokenizer.special_tokens:
        raise DataError(f"{type(tokenizer).__name__} has no chat special tokens; "
                        "use a Llama 3 or the byte tokenizer for chat data")
    try:
        turns = [role_and_content(m) for m in messages]
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


def check_train_on(train_on: str) -> None:
    """DataError unless train_on is one of TRAIN_ON."""
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


class BadLine(Exception):
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
    if "chosen" in keys and "rejected" in keys:  # before "prompt": a pair has one too
        return "preference"
    for fmt, key in (("chat", "messages"), ("alpaca", "instruction"), ("prompt-completion", "prompt"),
                     ("text", "text")):
        if key in keys:
            return fmt
    found = ", ".join(list(keys)[:8]) or f"a JSON {type(record).__name__}"
    raise DataError(f"{path}:{lineno}: cannot detect the data format from the keys ({found}); expected "
                    '"messages" (chat), "instruction" (alpaca), "prompt" (prompt-completion), "text", or '
                    '"chosen" and "rejected" (preference), or pass the format (--data-format)')


def is_chat_data(sources: Sources, data_format: str = "auto") -> bool:
    """True when any source file is a conversation format: train on the
    conversation cache and ChatDataset rather than the pretraining token cache.
    (Preference files count too: the conversation cache refuses them, naming the fix.)"""
    return any(detect_data_format(f, data_format) != "text" for f in find_source_files(sources))


def is_preference_data(sources: Sources, data_format: str = "auto") -> bool:
    """True when any source file holds preference pairs: the pair cache
    (llama/data/pair_cache.py) reads them, and refuses the other files by name."""
    return any(detect_data_format(f, data_format) == "preference" for f in find_source_files(sources))


def _messages(record, fmt: str) -> list[dict]:
    """The messages of one parsed record in format `fmt`; BadLine when malformed."""
    fix = FORMAT_FIX[fmt]
    if not isinstance(record, dict):
        raise BadLine(f"expected a JSON object, got a JSON {type(record).__name__}", fix)
    if fmt == "chat":
        return chat_messages(record, fix)
    if fmt == "alpaca":
        instruction, output = string_field(record, "instruction", fix), string_field(record, "output", fix)
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise BadLine(f'"input" is a JSON {type(extra).__name__}, expected a string', fix)
        user = instruction + "\n\n" + extra if extra else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt == "prompt-completion":
        return [{"role": "user", "content": string_field(record, "prompt", fix)},
                {"role": "assistant", "content": string_field(record, "completion", fix)}]
    raise AssertionError(fmt)


def string_field(record: dict, key: str, fix: str) -> str:
    if key not in record:
        raise BadLine(f'no "{key}" field (keys: {", ".join(list(record)[:8]) or "none"})', fix)
    if not isinstance(record[key], str):
        raise BadLine(f'"{key}" is a JSON {type(record[key]).__name__}, expected a string', fix)
    return record[key]


def chat_messages(record: dict, fix: str, key: str = "messages") -> list[dict]:
    """record[key] checked as a non-empty list of {"role", "content"} messages; BadLine if it is not."""
    if key not in record:
        raise BadLine(f'no "{key}" field (keys: {", ".join(list(record)[:8]) or "none"})', fix)
    messages = record[key]
    if not isinstance(messages, list) or not messages:
        raise BadLine(f'"{key}" must be a non-empty list of {{"role", "content"}} objects', fix)
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise BadLine(f"message {i} is a JSON {type(message).__name__}, not an object", fix)
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise BadLine(f"message {i} has unknown role {role!r}",
                           f"use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise BadLine(f'message {i} "content" is a JSON {type(content).__name__}, expected a string',
                           "give the text of the message as a string")
    return messages


@dataclass
class SkipReport:
    """The bad lines skipped in one file (or one part of it), for its warning line."""

    count: int = 0
    first: str = ""  # "line 7: unknown role 'bot'"

    def add(self, other: "SkipReport") -> None:
        if other.count and not self.count:
            self.first = other.first
        self.count += other.count

    def line(self, path: Path) -> str:
        return f"warning: {path}: skipped {self.count} bad lines (first: {self.first})"


def part_conversations(part: FilePart, tokenizer: Tokenizer, train_on: str,
                       skip: SkipReport | None) -> Iterator[tuple[list[int], list[int]]]:
    """(ids, labels) per conversation of one part of a file. A bad line raises DataError
    naming file and line, or is counted in `skip` when skipping."""
    if part.fmt == "text":
        for text in part_documents(part, FileReport()):
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
                raise BadLine(f"not valid JSON ({getattr(e, 'msg', e)})", FORMAT_FIX[part.fmt]) from None
            messages = _messages(record, part.fmt)
            try:
                yield encode_conversation(tokenizer, messages, train_on)
            except DataError as e:
                reason, _, fix = str(e).partition("; ")
                raise BadLine(reason, fix or FORMAT_FIX[part.fmt]) from None
        except BadLine as bad:
            skip_or_raise(part, lineno, bad, skip)


def skip_or_raise(part: FilePart, lineno: int, bad: BadLine, skip: SkipReport | None) -> None:
    """A bad line: DataError "FILE:LINE: reason; fix", or counted in `skip` when skipping."""
    if skip is None:
        raise DataError(f"{part.path}:{lineno}: {bad.reason}; {bad.fix}, "
                        "or skip bad lines (--skip-bad-lines)") from None
    if not skip.count:
        skip.first = f"line {lineno}: {bad.reason}"
    skip.count += 1
