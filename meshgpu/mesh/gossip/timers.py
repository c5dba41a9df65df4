"""The core's deadlines: one heap of timers with lazy cancellation.

The core never reads a clock. It records when each thing is due (the next probe, a probe's
timeout, a suspicion's expiry, ...) and reports the earliest with ``next_deadline()``; the shell
sleeps until then (or until a packet arrives) and calls ``tick(now)``, which fires everything due
by ``now`` in deadline order. A member whose event loop ran late simply fires several timers in
one tick, as a real one would after a stall.
"""

from __future__ import annotations

import enum
import heapq
from typing import Any


class TimerKind(enum.Enum):
    PROBE = "probe"
    """Start the next probe (every probe interval)."""
    PROBE_TIMEOUT = "probe-timeout"
    """No direct ack: ask for indirect probes (and try the stream ping)."""
    PROBE_END = "probe-end"
    """No ack at all by the end of the (scaled) probe interval: suspect the target."""
    RELAY = "relay"
    """An indirect ping we relay got no ack: send the requester a nack, forget the relay."""
    SUSPICION = "suspicion"
    """A suspicion expired: declare the member dead."""
    GOSSIP = "gossip"
    PUSH_PULL = "push-pull"
    RECONNECT = "reconnect"
    REAP = "reap"


class Timer:
    """One pending deadline. ``key`` says what it is about (a probe's seq, a member id)."""

    __slots__ = ("cancelled", "due", "key", "kind")

    def __init__(self, due: float, kind: TimerKind, key: Any) -> None:
        self.due = due
        self.kind = kind
        self.key = key
        self.cancelled = False


class Timers:
    """A min-heap of timers; cancelled ones are skipped when they reach the top."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = 0  # ties fire in scheduling order, which keeps runs deterministic

    def add(self, due: float, kind: TimerKind, key: Any = None) -> Timer:
        timer = Timer(due, kind, key)
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, timer))
        return timer

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> Timer | None:
        """The earliest live timer due at or before ``now``, removed; ``None`` if none."""
        heap = self._heap
        while heap:
            due, _, timer = heap[0]
            if timer.cancelled:
                heapq.heappop(heap)
                continue
            if due > now:
                return None
            heapq.heappop(heap)
            return timer
        return None

    def clear(self) -> None:
        self._heap.clear()
