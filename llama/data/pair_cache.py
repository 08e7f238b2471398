"""The pair cache: preference pairs encoded once, stored as the conversation cache stores conversations.

Sequence 2i of the storage is pair i's chosen sequence, 2i + 1 its rejected one, each
with its loss mask (llama/data/preference.py says what they are). The cache is keyed
like the conversation cache, on the cache's format version, the sha256 of the files'
bytes, the tokenizer's fingerprint and skip_bad_lines, so a changed file or tokenizer
is never served stale; `PairCache.key` is that key, for what is stored about the pairs
(the reference log-probabilities of DPO). Build it on one rank (`load_pair_cache`),
barrier, then open it on all (`open_pair_cache`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from llama.data.chat import DATA_FORMATS, SkipReport, detect_data_format
from llama.data.chat_cache import (
    ConversationCache, EncodedConversations, build_conversation_cache, encoded_sequences, read_conversation_cache)
from llama.data.errors import DataError, log
from llama.data.files import FilePart, PathLike, Sources, find_source_files
from llama.data.preference import FIX, identical_line, part_pairs
from llama.data.token_cache import default_cache_dir, open_built_cache, sha256_hex, source_stats
from llama.tokenizer import Tokenizer

PAIR_CACHE_VERSION = 1
PAIR_FORMATS = ("auto", "preference")  # the data formats a pair cache reads


@dataclass
class EncodedPairs(EncodedConversations):
    """One chunk's pairs, two sequences each, and per part its pairs with chosen == rejected."""

    identical: list[tuple[Path, SkipReport]] = field(default_factory=list)


def encode_pair_chunk(tokenizer: Tokenizer, chunk: list[FilePart], skip_bad_lines: bool) -> EncodedPairs:
    sequences, skips, identical = [], [], []
    for part in chunk:
        skip, same = (SkipReport() if skip_bad_lines else None), SkipReport()
        for chosen, rejected in part_pairs(part, tokenizer, skip, same):
            sequences += [chosen, rejected]
        if skip is not None:
            skips.append((part.path, skip))
        identical.append((part.path, same))
    encoded = encoded_sequences(sequences, skips, chunk)
    return EncodedPairs(**vars(encoded), identical=identical)


@dataclass
class PairCache:
    """Preference pairs on disk: pair i is sequences 2i (chosen) and 2i + 1 (rejected)."""

    sequences: ConversationCache  # the storage, two sequences a pair
    key: str  # changes whenever the data or the tokenizer does
    identical: dict[str, list] = field(default_factory=dict)  # file -> [pairs with chosen == rejected, first]

    @property
    def path(self) -> Path:  # the .json description
        return self.sequences.path

    @property
    def files(self) -> list[Path]:
        return self.sequences.files

    @property
    def hit(self) -> bool:
        return self.sequences.hit

    @property
    def skipped(self) -> dict[str, list]:
        return self.sequences.skipped

    @property
    def max_token_id(self) -> int:
        return self.sequences.max_token_id

    @property
    def num_pairs(self) -> int:
        return self.sequences.num_conversations // 2

    @property
    def num_docs(self) -> int:  # what split_documents' callers count: a validation split holds out whole pairs
        return self.num_pairs

    @property
    def num_tokens(self) -> int:
        return len(self.sequences.tokens)

    def pair(self, i: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """((ids, labels) of the chosen sequence, (ids, labels) of the rejected one), int64."""
        if not 0 <= i < self.num_pairs:
            raise IndexError(f"pair {i} is outside 0..{self.num_pairs - 1} of {self.describe()}")
        return self.sequences.conversation(2 * i), self.sequences.conversation(2 * i + 1)

    def describe(self) -> str:
        return self.sequences.describe()


def load_pair_cache(sources: Sources, tokenizer: Tokenizer, cache_dir: PathLike | None = None, *,
                    data_format: str = "auto", skip_bad_lines: bool = False, quiet: bool = False,
                    workers: int = 1) -> PairCache:
    """Encode the preference pairs of `sources` into a cache, or open the one a previous run left.

    Every file must be preference data (detected, or forced with data_format="preference");
    any other is a DataError naming it. Reused while the files' bytes (sha256), the
    tokenizer and skip_bad_lines are unchanged. A build encodes in `workers` processes
    (1: in this one); the cache is the same either way.
    """
    if data_format not in PAIR_FORMATS:
        if data_format not in DATA_FORMATS:
            raise DataError(f"data format {data_format!r} is not one of {', '.join(DATA_FORMATS)}")
        raise DataError(f"--data-format {data_format} is not preference data: DPO reads pairs; pass "
                        "--data-format preference or auto")
    files = find_source_files(sources)
    formats = [detect_data_format(f, data_format) for f in files]
    for path, fmt in zip(files, formats):
        if fmt != "preference":
            raise DataError(f"{path}: is not preference data (it reads as {fmt}); {FIX}, or pass --data-format "
                            "preference to read it as pairs, or train it without --objective dpo")
    stats = source_stats(files)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(sources)
    roots = sources if not isinstance(sources, (str, os.PathLike)) else [sources]
    settings = [data_format, str(skip_bad_lines)]
    slot = sha256_hex(*(str(Path(r).resolve()) for r in roots), tokenizer.fingerprint, "pairs", *settings)[:16]
    key = sha256_hex("pairs", str(PAIR_CACHE_VERSION), json.dumps(stats), json.dumps(formats),
                     tokenizer.fingerprint, *settings)
    meta_path = cache_dir / f"{slot}.pairs.json"
    cache = _open_pair_cache(meta_path, key, files)
    if cache is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache = _build_pair_cache(files, formats, stats, tokenizer, meta_path, key, skip_bad_lines,
                                  quiet=quiet, workers=workers)
    elif not quiet:
        log(f"pair cache hit: {meta_path} ({cache.num_pairs:,} pairs, {cache.num_tokens:,} tokens "
            f"from {len(files)} files)")
    for path, (count, first) in cache.skipped.items():
        log(SkipReport(count, first).line(Path(path)))
    for path, (count, first) in cache.identical.items():
        log(identical_line(path, SkipReport(count, first)))
    return cache


def open_pair_cache(meta_path: PathLike, sources: Sources) -> PairCache:
    """The cache at `meta_path`, as rank 0 just built or found it, without hashing the
    sources again (see llama.data.token_cache.open_token_cache)."""
    return open_built_cache(meta_path, sources, _open_pair_cache, "pair cache")


def _open_pair_cache(meta_path: Path, key: str, files: list[Path]) -> PairCache | None:
    sequences = read_conversation_cache(meta_path, key, files)
    if sequences is None:
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != "pairs" or sequences.num_conversations % 2:
        return None  # not a pair cache, or a broken one: rebuild
    return PairCache(sequences, key, meta["identical"])


def _build_pair_cache(files: list[Path], formats: list[str], stats: list, tokenizer: Tokenizer, meta_path: Path,
                      key: str, skip_bad_lines: bool, *, quiet: bool, workers: int) -> PairCache:
    identical = {path: SkipReport() for path in files}

    def count_identical(encoded: EncodedPairs) -> None:
        for path, report in encoded.identical:
            identical[path].add(report)

    def extra_meta() -> dict:
        return {"kind": "pairs", "pair_cache_version": PAIR_CACHE_VERSION,
                "identical": {str(p): [r.count, r.first] for p, r in identical.items() if r.count}}

    encode = partial(encode_pair_chunk, skip_bad_lines=skip_bad_lines)
    sequences = build_conversation_cache(files, formats, stats, tokenizer, meta_path, key, encode, extra_meta,
                                         quiet=quiet, workers=workers, unit="pairs", per_item=2,
                                         on_chunk=count_identical)
    return PairCache(sequences, key, extra_meta()["identical"])
