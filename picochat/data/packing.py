"""Best-fit packing: the pool of pending documents both loaders fill their rows from.

`BestFitPool` keeps documents ordered by (length, arrival). A row is filled by repeatedly taking the
longest pending document that still fits the room left (`take_fitting`); among documents of equal
length the one that arrived first goes first, so no document waits forever. The pretraining loader
(`loader.py`, rows of raw text; it crops the shortest document when nothing fits) and the chat batcher
(`chat.py`, whole conversations; it never crops) share it, so they pack the same way.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

SEQ_BITS = 40  # key = length << SEQ_BITS | arrival: one sorted list of ints orders by (length, arrival)
SEQ_MASK = (1 << SEQ_BITS) - 1


class BestFitPool:
    """Pending documents (any payload with a length), best-fit retrieval, arrival-ordered ties."""

    def __init__(self) -> None:
        self._keys: list[int] = []  # sorted
        self._items: dict[int, Any] = {}  # arrival -> payload
        self.next_seq = 0  # arrival number of the next document added

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, item: Any, length: int, seq: int | None = None) -> None:
        """Add a document of `length` tokens; `seq` restores a saved arrival number (state loading)."""
        if seq is None:
            seq, self.next_seq = self.next_seq, self.next_seq + 1
        self._items[seq] = item
        bisect.insort(self._keys, (length << SEQ_BITS) | seq)

    def take_fitting(self, room: int) -> Any | None:
        """Remove and return the longest document of at most `room` tokens (the earliest among equal
        lengths), or None when none fits."""
        keys = self._keys
        i = bisect.bisect_right(keys, (room << SEQ_BITS) | SEQ_MASK) - 1
        if i < 0:
            return None
        i = bisect.bisect_left(keys, (keys[i] >> SEQ_BITS) << SEQ_BITS)  # earliest arrival of that length
        return self._items.pop(keys.pop(i) & SEQ_MASK)

    def take_shortest(self) -> Any:
        return self._items.pop(self._keys.pop(0) & SEQ_MASK)

    def total_length(self) -> int:
        return sum(k >> SEQ_BITS for k in self._keys)

    def pending(self) -> Iterator[tuple[int, int, Any]]:
        """(arrival, length, payload) of every pending document, in pool order (for saving state)."""
        for k in self._keys:
            yield k & SEQ_MASK, k >> SEQ_BITS, self._items[k & SEQ_MASK]

    def clear(self, next_seq: int = 0) -> None:
        self._keys, self._items, self.next_seq = [], {}, next_seq
