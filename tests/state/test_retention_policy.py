"""The retention policy over a week of wall time, in milliseconds: the leader's trigger
(``prune_due``) and the ``PruneRuns`` it proposes, with the time passed in as the agent's clock
passes it (``Clock.wall``)."""

from __future__ import annotations

from meshgpu.state import PruneRuns, StateMachine
from meshgpu.state.retention import prune_due
from tests.state.test_state import apply, finish, node, schedule, start_all, submit, task

WEEK = 7 * 86400.0


def test_finished_runs_go_by_age_and_by_count() -> None:
    sm = StateMachine()
    apply(sm, node("n1", 8))
    apply(sm, *(submit(f"r{i}", task("H100:1"), at=1.0) for i in range(4)))
    schedule(sm)
    start_all(sm)
    finish(sm, "r0", at=100.0)
    finish(sm, "r1", at=200.0)
    runs = sm.runs.values()
    # By age: not a second before the first finished run is a week old.
    assert not prune_due(runs, 100.0 + WEEK, keep=1000, keep_for_s=WEEK)
    assert prune_due(runs, 100.0 + WEEK + 1, keep=1000, keep_for_s=WEEK)
    apply(sm, PruneRuns(at=100.0 + WEEK + 1, keep=1000, max_age_s=WEEK))
    assert set(sm.runs) == {"r1", "r2", "r3"}  # the active ones stay, whatever their age
    # By count: a little past the limit (one entry per 10 %), newest kept.
    finish(sm, "r2", at=300.0)
    finish(sm, "r3", at=400.0)
    assert not prune_due(sm.runs.values(), 500.0, keep=2, keep_for_s=WEEK)
    finish_more = submit("r4", task("H100:1"), at=450.0)
    apply(sm, finish_more)
    schedule(sm)
    start_all(sm)
    finish(sm, "r4", at=500.0)
    assert prune_due(sm.runs.values(), 600.0, keep=2, keep_for_s=WEEK)
    apply(sm, PruneRuns(at=600.0, keep=2, max_age_s=WEEK))
    assert set(sm.runs) == {"r3", "r4"}
