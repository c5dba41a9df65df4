"""The retention policy's trigger: when the leader should propose ``PruneRuns`` (pure: the time
comes in as an argument)."""

from __future__ import annotations

from collections.abc import Iterable

from meshgpu.state.records import RunRecord


def prune_due(runs: Iterable[RunRecord], now: float, keep: int, keep_for_s: float) -> bool:
    """A finished run is older than ``keep_for_s`` (wall seconds at ``now``), or more than
    ``keep`` runs are finished -- a little past the count before pruning: one entry per 10 %."""
    finished = [r for r in runs if r.status.is_finished()]
    old = any(now - (r.finished_at or now) > keep_for_s for r in finished)
    return old or len(finished) > keep + max(keep // 10, 1)
