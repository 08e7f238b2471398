"""Packing whole conversations into windows of seq_len + 1 tokens, then padding.

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
"""

from __future__ import annotations

import bisect

import numpy as np

from llama.data.chat_cache import ConversationCache
from llama.data.errors import DataError
from llama.data.windows import IGNORE_INDEX, Row, WindowDataset, check_documents


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
                else check_documents(documents, cache.num_conversations, self.name))
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
