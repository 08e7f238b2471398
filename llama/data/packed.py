"""Pretraining windows: the token stream cut into windows of seq_len + 1 tokens with stride seq_len.

Inputs are a window's first seq_len tokens, targets its last seq_len, and
consecutive windows share one token, so every token is a target exactly once
per epoch (but the first, and a tail shorter than seq_len). Documents run across
window boundaries (no padding). With `document_masking=True` each batch also
carries window-local document ids (a document cut by the window's start is id 0):

    tokens        ... d r a g o n EOS | BOS t h e EOS | BOS a n ...
    document_ids    0 0 0 0 0 0  0    |  1  1 1 1  1  |  2  2 2

With `documents=` (an index array, e.g. from `split_documents`) the stride
packing runs over those documents only, concatenated virtually.
Chat and instruction data (whole conversations per window, padding, labels)
are packed in llama/data/chat_packing.py.
"""

from __future__ import annotations

import numpy as np

from llama.data.errors import DataError
from llama.data.token_cache import TokenCache
from llama.data.windows import Row, WindowDataset, check_documents


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
            documents = check_documents(documents, len(doc_offsets) - 1, self.name)
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
