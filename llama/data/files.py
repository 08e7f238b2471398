"""Reading data files: finding them, cutting them into parts of whole lines, their documents.

Text files (TEXT_SUFFIXES) are one document each; a `.jsonl` file is one document
a line, its "text" field (conversation formats are read in llama/data/chat.py).
Invalid UTF-8 is not an error: it is replaced with U+FFFD and counted in a
`FileReport`, for a warning line. Parts of about PART_BYTES, grouped into chunks,
are the unit of work of the tokenizing threads and processes (llama/data/workers.py).
"""

from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

from llama.data.errors import DataError

PathLike = Union[str, os.PathLike]
Sources = Union[PathLike, Sequence[PathLike]]

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
class FileReport:
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
    fmt: str  # "text", or a conversation format of llama/data/chat.py
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


def part_documents(part: FilePart, report: FileReport) -> Iterator[str]:
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

