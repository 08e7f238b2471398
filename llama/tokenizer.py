"""Tokenizers behind one interface, chosen from a path by `load_tokenizer`.

Three kinds:

- `Llama3Tokenizer`: tiktoken BPE read from Meta's `tokenizer.model` (a text file
  of `base64(token bytes) rank` lines) plus 256 special tokens. Token ids are
  identical to Meta's reference tokenizer (tests/test_tokenizer.py checks it).
- `SentencePieceTokenizer`: a SentencePiece `tokenizer.model` (Llama 2). Ids of
  BOS/EOS/UNK/PAD come from the model itself.
- `ByteTokenizer`: UTF-8 bytes 0..255 plus 8 special tokens, vocab_size 264. It
  needs no file, so the demo runs anywhere. 264 = 256 + 8 is a multiple of 8,
  so a vocab-parallel embedding splits evenly over 1, 2, 4 or 8 tensor-parallel
  ranks.

All of them offer `encode(text, bos, eos)`, `decode(ids)`, `bos_id`, `eos_id`,
`pad_id`, `vocab_size`, `special_tokens` (name -> id), `stop_tokens`,
`encode_batch` (the data pipeline's fast path) and a `fingerprint` that changes
whenever the token ids could change (the token cache keys on it).
Llama 3 and the byte tokenizer also encode chat dialogs (`encode_dialog`).

Special-token strings inside ordinary text are encoded as plain text unless
passed in `allowed_special`: text from the internet must not be able to inject
a `<|eot_id|>` into the training stream.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AbstractSet, Iterable, Literal, Sequence, Union

import numpy as np

AllowedSpecial = Union[Literal["all"], AbstractSet[str]]
PathLike = Union[str, os.PathLike]

# ---------------------------------------------------------------------------
# Llama 3 constants

# The pre-tokenization regex of Llama 3 (GPT-4's, but digits in groups of 1-3).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256

# Special tokens with a name, as offsets from the first special id (128000).
# Meta's current tokenizer (llama_models) names 128005 <|step_id|> and 128011
# <|image|>; the Llama 3.1 release called them reserved tokens. The other
# unnamed ids are <|reserved_special_token_K|> with K counting up from 0 in id
# order, which gives Meta's numbering (128002 -> 0, 128003 -> 1, 128012 -> 2, ...).
LLAMA3_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    5: "<|step_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",  # end of message: the model expects a tool result next
    9: "<|eot_id|>",  # end of turn
    10: "<|python_tag|>",
    11: "<|image|>",
}

# tiktoken's regex engine panics above ~400k characters per call and becomes
# quadratic on runs of > 25,000 characters of one class (all whitespace or all
# non-whitespace), see github.com/openai/tiktoken/issues/195. Meta cuts the
# input at the same two limits; cutting at exactly the same places is what keeps
# our ids equal to theirs on such inputs.
TIKTOKEN_MAX_CHARS = 400_000
TIKTOKEN_MAX_RUN = 25_000

# A run longer than TIKTOKEN_MAX_RUN, matched only from its first character
# (the look-behinds make the scan linear: inside a run both branches fail at once).
# Python's \s is exactly str.isspace(), the class Meta's splitter uses.
_LONG_RUN = re.compile(
    r"(?<!\S)\S{%d,}|(?<!\s)\s{%d,}" % (TIKTOKEN_MAX_RUN + 1, TIKTOKEN_MAX_RUN + 1)
)

# Any run longer than TIKTOKEN_MAX_RUN contains a whole aligned block of
# _BLOCK = MAX_RUN // 2 characters of one class. Checking each block for one
# whitespace and one non-whitespace character stops after a few characters in
# ordinary text, so the exact (slower) _LONG_RUN scan runs only on suspects.
_BLOCK = TIKTOKEN_MAX_RUN // 2
_SPACE, _NON_SPACE = re.compile(r"\s"), re.compile(r"\S")

# Lines of a tiktoken BPE file: base64 of the token's bytes, a space, its rank.
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+$")

# Chat roles and the header text each one gets ("tool" is Meta's alias).
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant",
              "ipython": "ipython", "tool": "ipython"}
_CHAT_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

ACCEPTED_KINDS = (
    "'bytes' (or None) for the built-in byte tokenizer; a Llama 3 tiktoken "
    "tokenizer.model (lines of 'base64 rank'); a SentencePiece tokenizer.model "
    "(Llama 2); or a directory holding a tokenizer.model"
)


class TokenizerFileError(ValueError):
    """A tokenizer path that is missing, malformed or of an unknown kind."""


# ---------------------------------------------------------------------------
# The common interface


class Tokenizer(ABC):
    """What every tokenizer offers. Subclasses set the attributes in __init__."""

    kind: str  # "tiktoken", "sentencepiece" or "bytes"
    bos_id: int
    eos_id: int
    pad_id: int  # -1 when the model has no pad token (Llama 2, as in Meta's code)
    vocab_size: int  # rows the embedding table needs, special tokens included
    special_tokens: dict[str, int]
    stop_tokens: list[int]  # generation stops at any of these
    fingerprint: str  # sha256 hex; changes whenever the ids could change

    @abstractmethod
    def encode(self, text: str, bos: bool = False, eos: bool = False, *,
               allowed_special: AllowedSpecial = frozenset()) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False,
                     num_threads: int | None = None) -> list[np.ndarray]:
        """Encode many documents (special strings as text) into uint32 arrays.

        numpy instead of lists avoids one Python int per token in the data
        pipeline. Subclasses override it with a parallel version.
        """
        return [np.asarray(self.encode(t, bos, eos), dtype=np.uint32) for t in texts]

    def encode_dialog(self, messages: Iterable) -> list[int]:
        """Llama 3 chat format, ending with an open assistant header for the reply.

        `<|begin_of_text|>`, then per message
        `<|start_header_id|>role<|end_header_id|>\\n\\n` + stripped content + `<|eot_id|>`.
        A message is a dict {"role", "content"} or an object with those attributes
        (e.g. llama_models' RawMessage with text content).
        """
        missing = [s for s in _CHAT_SPECIALS if s not in self.special_tokens]
        if missing:
            raise NotImplementedError(
                f"{type(self).__name__} has no chat special tokens {missing}; the Llama 2 "
                "[INST] chat format is not implemented, use a Llama 3 or the byte tokenizer")
        ids = [self.bos_id]
        for message in messages:
            role, content = role_and_content(message)
            ids += self._encode_header(role)
            ids += self.encode(content.strip())
            ids.append(self.special_tokens["<|eot_id|>"])
        ids += self._encode_header("assistant")
        return ids

    def _encode_header(self, role: str) -> list[int]:
        # Role and "\n\n" are encoded separately, not merged with the content,
        # as Meta does: merging would let BPE join "\n\n" with the content.
        return ([self.special_tokens["<|start_header_id|>"]] + self.encode(role)
                + [self.special_tokens["<|end_header_id|>"]] + self.encode("\n\n"))

    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        allowed = frozenset(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special has unknown special tokens {sorted(unknown)}; "
                             f"{type(self).__name__} knows e.g. {sorted(self.special_tokens)[:4]}")
        return allowed

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


def role_and_content(message) -> tuple[str, str]:
    """(header role, content) of a chat message: a dict or an object with role and content."""
    if isinstance(message, dict):
        role, content = message.get("role"), message.get("content")
    else:
        role, content = getattr(message, "role", None), getattr(message, "content", None)
    role = getattr(role, "value", role)  # accept enum roles
    if role not in CHAT_ROLES:
        raise ValueError(f"chat message role {role!r} is not one of {sorted(CHAT_ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"chat message content must be a str, got {type(content).__name__} "
                         f"(images and tool calls are not supported)")
    return CHAT_ROLES[role], content


def _sha256(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _parallel_map(fn, items: list, num_threads: int | None) -> list:
    # tiktoken and sentencepiece release the GIL while encoding, so threads
    # scale with cores without pickling text to worker processes.
    num_threads = num_threads or _default_threads()
    if num_threads == 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(num_threads, len(items))) as pool:
        return list(pool.map(fn, items))


def _frame(ids: np.ndarray, bos_id: int | None, eos_id: int | None) -> np.ndarray:
    parts = ([np.array([bos_id], np.uint32)] if bos_id is not None else []) + [ids]
    if eos_id is not None:
        parts.append(np.array([eos_id], np.uint32))
    return np.concatenate(parts).astype(np.uint32, copy=False)


def _to_int_list(ids) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


# ---------------------------------------------------------------------------
# Llama 3 (tiktoken)


def split_for_tiktoken(text: str) -> list[str]:
    """Cut `text` where Meta's tokenizer cuts it, so tiktoken stays fast and safe.

    First into chunks of TIKTOKEN_MAX_CHARS characters, then each chunk wherever
    a run of whitespace or of non-whitespace reaches TIKTOKEN_MAX_RUN characters
    (counting restarts at each chunk and at each cut). Ordinary text has no such
    run and comes back as one piece.
    """
    pieces = []
    for start in range(0, len(text), TIKTOKEN_MAX_CHARS):
        chunk = text[start:start + TIKTOKEN_MAX_CHARS]
        if len(chunk) <= TIKTOKEN_MAX_RUN or not _may_have_long_run(chunk):
            pieces.append(chunk)
            continue
        cuts = [cut for run in _LONG_RUN.finditer(chunk)
                for cut in range(run.start() + TIKTOKEN_MAX_RUN, run.end(), TIKTOKEN_MAX_RUN)]
        bounds = [0, *cuts, len(chunk)]
        pieces += [chunk[a:b] for a, b in zip(bounds, bounds[1:])]
    return pieces


def _may_have_long_run(chunk: str) -> bool:
    for start in range(0, len(chunk) - _BLOCK + 1, _BLOCK):
        end = start + _BLOCK
        if not _SPACE.search(chunk, start, end) or not _NON_SPACE.search(chunk, start, end):
            return True
    return False


def read_tiktoken_ranks(path: PathLike) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one `base64(token bytes) rank` line per token."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise TokenizerFileError(
                    f"{path}:{lineno}: expected 'base64 rank' in a tiktoken tokenizer file, "
                    f"got {line[:60]!r}") from None
    return ranks


def llama3_special_tokens(num_base_tokens: int = 128_000) -> dict[str, int]:
    """The 256 Llama 3 special tokens: name -> id (ids follow the BPE ranks)."""
    specials, reserved = {}, 0
    for offset in range(LLAMA3_NUM_SPECIAL_TOKENS):
        name = LLAMA3_NAMED_SPECIALS.get(offset)
        if name is None:
            name, reserved = f"<|reserved_special_token_{reserved}|>", reserved + 1
        specials[name] = num_base_tokens + offset
    return specials


class Llama3Tokenizer(Tokenizer):
    """Llama 3 tokenizer: tiktoken BPE with Meta's split pattern and specials."""

    kind = "tiktoken"

    def __init__(self, model_path: PathLike):
        import tiktoken  # only this tokenizer needs it

        self.model_path = Path(model_path)
        ranks = read_tiktoken_ranks(self.model_path)
        self.special_tokens = llama3_special_tokens(len(ranks))
        self._enc = tiktoken.Encoding(
            name=self.model_path.name, pat_str=LLAMA3_SPLIT_PATTERN,
            mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.vocab_size = len(ranks) + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.python_tag_id = self.special_tokens["<|python_tag|>"]
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]
        self.fingerprint = _sha256(self.kind, self.model_path.read_bytes(),
                                   LLAMA3_SPLIT_PATTERN, repr(sorted(self.special_tokens.items())))

    def encode(self, text: str, bos: bool = False, eos: bool = False, *,
               allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        allowed = self._allowed(allowed_special)
        ids = [self.bos_id] if bos else []
        for piece in split_for_tiktoken(text):
            # disallowed_special=() : special strings not allowed are plain text
            ids += self._enc.encode(piece, allowed_special=allowed, disallowed_special=())
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False,
                     num_threads: int | None = None) -> list[np.ndarray]:
        pieces, owner = [], []
        for i, text in enumerate(texts):
            for piece in split_for_tiktoken(text):
                pieces.append(piece)
                owner.append(i)
        encoded = _parallel_map(
            lambda p: self._enc.encode_to_numpy(p, disallowed_special=()), pieces, num_threads)
        per_doc: list[list[np.ndarray]] = [[] for _ in texts]
        for i, ids in zip(owner, encoded):
            per_doc[i].append(ids)
        bos_id, eos_id = (self.bos_id if bos else None), (self.eos_id if eos else None)
        return [_frame(np.concatenate(parts) if parts else np.empty(0, np.uint32), bos_id, eos_id)
                for parts in per_doc]

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(_to_int_list(ids))


# ---------------------------------------------------------------------------
# Llama 2 (SentencePiece)


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece tokenizer (Llama 2: vocab 32000, unk 0, bos 1, eos 2, no pad)."""

    kind = "sentencepiece"

    def __init__(self, model_path: PathLike):
        import sentencepiece  # only this tokenizer needs it

        self.model_path = Path(model_path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.model_path))
        except (RuntimeError, OSError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenizerFileError(
                f"{self.model_path}: not a loadable SentencePiece model ({first_line}); "
                f"accepted: {ACCEPTED_KINDS}") from None
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id()
        self.unk_id = self._sp.unk_id()
        self.special_tokens = {self._sp.id_to_piece(i): i
                               for i in (self.unk_id, self.bos_id, self.eos_id, self.pad_id)
                               if i >= 0}
        self.stop_tokens = [self.eos_id]
        self.fingerprint = _sha256(self.kind, self.model_path.read_bytes())

    def encode(self, text: str, bos: bool = False, eos: bool = False, *,
               allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if allowed_special:
            raise ValueError("SentencePiece does not parse special-token strings in text; "
                             "add bos/eos with the bos= and eos= arguments instead")
        return ([self.bos_id] if bos else []) + self._sp.encode(text) + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False,
                     num_threads: int | None = None) -> list[np.ndarray]:
        encoded = self._sp.encode(list(texts), num_threads=num_threads or _default_threads())
        bos_id, eos_id = (self.bos_id if bos else None), (self.eos_id if eos else None)
        return [_frame(np.asarray(ids, dtype=np.uint32), bos_id, eos_id) for ids in encoded]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(_to_int_list(ids))


# ---------------------------------------------------------------------------
# Bytes (no file needed)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then 8 special tokens: vocab_size 264.

    256 <|begin_of_text|>, 257 <|end_of_text|>, 258 <|pad|>,
    259 <|start_header_id|>, 260 <|end_header_id|>, 261 <|eot_id|>,
    262-263 <|reserved_special_token_0|> and _1 (unused, they round the vocab
    to a multiple of 8). The names match Llama 3's so `encode_dialog` works.
    """

    kind = "bytes"
    SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>")

    def __init__(self):
        self.special_tokens = {name: 256 + i for i, name in enumerate(self.SPECIALS)}
        self._special_names = {i: name for name, i in self.special_tokens.items()}
        self.vocab_size = 256 + len(self.SPECIALS)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|pad|>"]
        self.stop_tokens = [self.eos_id, self.special_tokens["<|eot_id|>"]]
        self.fingerprint = _sha256(self.kind, "v1", repr(self.SPECIALS))

    def encode(self, text: str, bos: bool = False, eos: bool = False, *,
               allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        allowed = self._allowed(allowed_special)
        ids = [self.bos_id] if bos else []
        if allowed:
            pattern = "(" + "|".join(map(re.escape, sorted(allowed, key=len, reverse=True))) + ")"
            for i, part in enumerate(re.split(pattern, text)):
                # re.split with one group puts the matched specials at odd indices
                ids += [self.special_tokens[part]] if i % 2 else list(_utf8(part))
        else:
            ids += list(_utf8(text))
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False,
                     num_threads: int | None = None) -> list[np.ndarray]:
        bos_id, eos_id = (self.bos_id if bos else None), (self.eos_id if eos else None)
        return [_frame(np.frombuffer(_utf8(t), np.uint8).astype(np.uint32), bos_id, eos_id)
                for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for i in _to_int_list(ids):
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if i not in self._special_names:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocab of {self.vocab_size}")
            out.append(self._special_names[i])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


def _utf8(text: str) -> bytes:
    # "replace" turns lone surrogates (legal in a Python str, not in UTF-8) into "?"
    return text.encode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# Detection


def detect_tokenizer_kind(path: PathLike | None) -> str:
    """'bytes', 'tiktoken' or 'sentencepiece' for `path`; TokenizerFileError otherwise."""
    if path is None or str(path) == "bytes":
        return "bytes"
    path = Path(path)
    if not path.is_file():
        raise TokenizerFileError(f"tokenizer file not found: {path}; accepted: {ACCEPTED_KINDS}")
    with open(path, "rb") as f:
        head = f.read(4096)
    lines = head.split(b"\n")[:-1][:8]  # complete lines only
    if lines and all(_TIKTOKEN_LINE.match(line.rstrip(b"\r")) for line in lines):
        return "tiktoken"
    # A SentencePiece ModelProto starts with field 1 (the pieces), length-delimited.
    if head[:1] == b"\x0a":
        return "sentencepiece"
    raise TokenizerFileError(f"{path}: unknown tokenizer file kind (first bytes {head[:16]!r}); "
                             f"accepted: {ACCEPTED_KINDS}")


def load_tokenizer(path: PathLike | None = None) -> Tokenizer:
    """The tokenizer for `path`, its kind detected from the file content.

    None or "bytes" -> ByteTokenizer; a directory -> its tokenizer.model (or
    original/tokenizer.model, the layout of Hugging Face Llama 3 repos).
    """
    if path is not None and str(path) != "bytes" and Path(path).is_dir():
        candidates = [Path(path) / "tokenizer.model", Path(path) / "original" / "tokenizer.model"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise TokenizerFileError(f"{path}: directory has no tokenizer.model or "
                                     f"original/tokenizer.model; accepted: {ACCEPTED_KINDS}")
        path = found[0]
    kind = detect_tokenizer_kind(path)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "tiktoken":
        return Llama3Tokenizer(path)
    return SentencePieceTokenizer(path)
