"""What this node's ingress counts per service, for the autoscaler (through gossip telemetry)
and ``/metrics``: cumulative completed requests (dstack counts completed ones only) and the
requests held right now for a service with no ready replica (scale-from-zero activation)."""

from __future__ import annotations


class ServiceCounters:
    """Per service (by run id). Plain counters, touched on the event loop only."""

    def __init__(self) -> None:
        self._completed: dict[str, int] = {}
        self._waiting: dict[str, int] = {}

    def completed(self, run_id: str, n: int = 1) -> None:
        self._completed[run_id] = self._completed.get(run_id, 0) + n

    def waiting(self, run_id: str, delta: int) -> None:
        left = self._waiting.get(run_id, 0) + delta
        if left > 0:
            self._waiting[run_id] = left
        else:
            self._waiting.pop(run_id, None)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """run id -> (completed requests since this agent started, requests waiting now)."""
        ids = self._completed.keys() | self._waiting.keys()
        return {r: (self._completed.get(r, 0), self._waiting.get(r, 0)) for r in ids}

    def forget(self, keep: set[str]) -> None:
        """Drop the counters of services not in ``keep`` (runs that are gone)."""
        for table in (self._completed, self._waiting):
            for run_id in [r for r in table if r not in keep]:
                del table[run_id]
