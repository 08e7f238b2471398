"""Preference pairs for DPO: {"prompt", "chosen", "rejected"} records, each reply encoded as SFT encodes it.

A `.jsonl` file of one pair a line, in either of TRL's two forms:

    standard        {"prompt": "...", "chosen": "...", "rejected": "..."}
                    the prompt is one user turn, the replies the assistant's: a pair's chosen
                    sequence is token for token SFT's {"prompt": p, "completion": chosen} with
                    --train-on last
    conversational  {"prompt": [{"role", "content"}, ...], "chosen": REPLY, "rejected": REPLY}
                    the prompt is the turns before the reply; a REPLY is the assistant's reply as a
                    string, as a message {"role": "assistant", "content": "..."}, or as a list of
                    exactly that one message (what TRL writes)

A pair's two sequences are `encode_conversation(prompt + [reply], train_on="last")`: the
labels are the final assistant content and its <|eot_id|>, exactly the tokens SFT would
train on, whose log-probabilities sum to the response's. Other keys are ignored.

A pair whose chosen and rejected sequences are the same is kept, as TRL keeps it, and
counted for a warning line: it states no preference (a DPO loss of log 2, no gradient).
TRL's implicit prompt (whole conversations in "chosen" and "rejected", no "prompt") is a
bad line whose fix is to move the shared turns into "prompt".
"""

from __future__ import annotations

import json
from typing import Iterator

from llama.data.chat import FORMAT_FIX, BadLine, SkipReport, chat_messages, encode_conversation, skip_or_raise
from llama.data.errors import DataError
from llama.data.files import FilePart
from llama.tokenizer import Tokenizer

Sequence = tuple[list[int], list[int]]  # (ids, labels) of one prompt + reply
FIX = FORMAT_FIX["preference"]


def encode_pair(tokenizer: Tokenizer, prompt: list[dict], chosen: dict, rejected: dict) -> tuple[Sequence, Sequence]:
    """(chosen (ids, labels), rejected (ids, labels)): the prompt's turns followed by each
    reply, encoded as SFT does with train_on="last"."""
    return (encode_conversation(tokenizer, prompt + [chosen], train_on="last"),
            encode_conversation(tokenizer, prompt + [rejected], train_on="last"))


def pair_messages(record) -> tuple[list[dict], dict, dict]:
    """(prompt messages, chosen reply, rejected reply) of one parsed record; BadLine when malformed."""
    if not isinstance(record, dict):
        raise BadLine(f"expected a JSON object, got a JSON {type(record).__name__}", FIX)
    if "prompt" not in record:
        raise BadLine(f'no "prompt" field (keys: {", ".join(list(record)[:8]) or "none"})',
                      'move the turns before the reply out of "chosen" and "rejected" into "prompt" '
                      "(implicit prompts are not read); " + FIX)
    prompt = record["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = chat_messages(record, FIX, key="prompt")
    else:
        raise BadLine(f'"prompt" is a JSON {type(prompt).__name__}, expected a string or a list of messages', FIX)
    return messages, _reply(record, "chosen"), _reply(record, "rejected")


def _reply(record: dict, key: str) -> dict:
    """record[key] as an assistant message: a string, an assistant message, or a list of exactly one."""
    if key not in record:
        raise BadLine(f'no "{key}" field (keys: {", ".join(list(record)[:8]) or "none"})', FIX)
    reply = record[key]
    if isinstance(reply, str):
        return {"role": "assistant", "content": reply}
    if isinstance(reply, list):
        if len(reply) != 1:
            raise BadLine(f'"{key}" is a list of {len(reply)} messages, expected exactly one assistant message',
                          'give the reply alone; earlier turns belong in "prompt"')
        reply = reply[0]
    if not isinstance(reply, dict):
        raise BadLine(f'"{key}" is a JSON {type(reply).__name__}, expected a string or an assistant message', FIX)
    if reply.get("role") != "assistant":
        raise BadLine(f'"{key}" is a message with role {reply.get("role")!r}, not the assistant\'s reply',
                      f'give "{key}" role "assistant"; earlier turns belong in "prompt"')
    if not isinstance(reply.get("content"), str):
        raise BadLine(f'"{key}" "content" is a JSON {type(reply.get("content")).__name__}, expected a string',
                      "give the text of the reply as a string")
    return reply


def part_pairs(part: FilePart, tokenizer: Tokenizer, skip: SkipReport | None,
               identical: SkipReport) -> Iterator[tuple[Sequence, Sequence]]:
    """(chosen, rejected) per pair of one part of a preference file. A bad line raises
    DataError naming file and line, or is counted in `skip` when skipping; a pair whose
    two sequences are the same is yielded and counted in `identical`."""
    if part.fmt != "preference":
        raise DataError(f"{part.path}: is not preference data (it reads as {part.fmt}); {FIX}")
    for lineno, raw in part.numbered_lines():
        if not raw.strip():
            continue
        try:
            try:
                record = json.loads(raw)
            except ValueError as e:
                raise BadLine(f"not valid JSON ({getattr(e, 'msg', e)})", FIX) from None
            prompt, chosen, rejected = pair_messages(record)
            try:
                pair = encode_pair(tokenizer, prompt, chosen, rejected)
            except DataError as e:
                reason, _, fix = str(e).partition("; ")
                raise BadLine(reason, fix or FIX) from None
        except BadLine as bad:
            skip_or_raise(part, lineno, bad, skip)
            continue
        if pair[0][0] == pair[1][0]:
            if not identical.count:
                identical.first = f"line {lineno}"
            identical.count += 1
        yield pair


def identical_line(path, report: SkipReport) -> str:
    """The warning line for the pairs of one file whose chosen and rejected are the same."""
    return (f"warning: {path}: {report.count} pairs have chosen == rejected (first: {report.first}); kept, as "
            "TRL keeps them: each states no preference (a DPO loss of log 2, no gradient)")
