"""Deadlines by key, earliest first: the broker core's timers, with no I/O.

Owns: at most one deadline per key (a task id), armed again or disarmed at will; the
earliest one still armed (:meth:`Deadlines.next`); and handing out those due at a
given time, earliest first, ties in the order they were armed
(:meth:`Deadlines.pop_due`). Times are whatever clock the caller uses; nothing here
reads one.

A heap with lazy deletion: re-arming or disarming only forgets the old entry, which
is dropped when it reaches the top, or when stale entries outnumber live ones.
"""

from __future__ import annotations

import heapq
import itertools

# Stale entries tolerated before the heap is rebuilt: twice the live ones, plus this.
_SLACK = 64


class Deadlines:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._live: dict[str, tuple[float, int]] = {}  # key -> its armed (when, order)
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def arm(self, key: str, when: float) -> None:
        """``key`` is due at ``when`` (instead of any deadline it had)."""
        entry = (when, next(self._order))
        self._live[key] = entry
        heapq.heappush(self._heap, (*entry, key))
        if len(self._heap) > 2 * len(self._live) + _SLACK:
            self._heap = [(when, order, key) for key, (when, order) in self._live.items()]
            heapq.heapify(self._heap)

    def disarm(self, key: str) -> None:
        self._live.pop(key, None)

    def next(self) -> float | None:
        """When the earliest armed deadline is due; None when none is armed."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> str | None:
        """The key of the earliest deadline due at ``now`` (disarmed), or None."""
        self._drop_stale()
        if not self._heap or self._heap[0][0] > now:
            return None
        _, _, key = heapq.heappop(self._heap)
        del self._live[key]
        return key

    def _drop_stale(self) -> None:
        while self._heap:
            when, order, key = self._heap[0]
            if self._live.get(key) == (when, order):
                return
            heapq.heappop(self._heap)
