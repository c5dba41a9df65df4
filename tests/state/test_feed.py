"""The state's change feed: what each apply changed, from a reader's cursor; bounded; a restore
starts a new epoch (readers rebuild)."""

from __future__ import annotations

from meshgpu.state import JobStatus, PruneRuns, SetRunPriority, StateMachine, StopRun
from meshgpu.state.feed import ChangeFeed
from tests.scheduler._world import finish, host, jobs, schedule, submit, task, world


def test_since_a_cursor_in_order_with_repeats() -> None:
    feed = ChangeFeed()
    assert feed.since(None) is None  # no cursor yet: rebuild
    start = feed.cursor()
    empty = feed.since(start)
    assert empty is not None and (empty.jobs, empty.nodes, empty.runs) == ([], [], [])
    feed.job("j1")
    feed.node("n1")
    feed.job("j2")
    feed.job("j1")
    feed.run("r")
    mid = feed.cursor()
    feed.node("n2")
    changes = feed.since(start)
    assert changes is not None
    assert changes.jobs == ["j1", "j2", "j1"] and changes.nodes == ["n1", "n2"]
    assert changes.runs == ["r"]
    later = feed.since(mid)
    assert later is not None and (later.jobs, later.nodes, later.runs) == ([], ["n2"], [])


def test_bounded_a_reader_left_behind_rebuilds() -> None:
    feed = ChangeFeed(limit=4)
    old = feed.cursor()
    for i in range(5):
        feed.job(f"j{i}")  # the fifth drops the oldest half
    assert len(feed.jobs) <= 4
    assert feed.since(old) is None  # its entries are gone
    recent = feed.cursor()
    feed.job("j5")
    changes = feed.since(recent)
    assert changes is not None and changes.jobs == ["j5"]
    # Cursors past the end (from another feed) are not served either.
    ahead = ChangeFeed()
    for i in range(9):
        ahead.node(f"n{i}")
    assert feed.since(ahead.cursor()) is None


def test_apply_notes_jobs_nodes_and_runs() -> None:
    sm = world(host("n1"), host("n2"))
    c0 = sm.feed.cursor()
    sm.apply_command(submit("a", task("H100:8", nodes=2), at=2))
    a = sm.feed.since(c0)
    assert a is not None and a.jobs == [j.job_id for j in jobs(sm, "a")] and a.nodes == []
    c1 = sm.feed.cursor()
    schedule(sm, now=3)  # placed (provisioning) then started (running)
    b = sm.feed.since(c1)
    assert b is not None and set(b.jobs) == {j.job_id for j in jobs(sm, "a")}
    assert set(b.nodes) == {"n1", "n2"}
    c2 = sm.feed.cursor()
    sm.apply_command(SetRunPriority(at=4, run_name="a", priority=5))
    c = sm.feed.since(c2)
    assert c is not None and c.runs == ["a"] and set(c.nodes) == {"n1", "n2"} and c.jobs == []
    c3 = sm.feed.cursor()
    finish(sm, "a", at=5)
    d = sm.feed.since(c3)
    assert d is not None and set(d.jobs) == {j.job_id for j in jobs(sm, "a")}
    assert set(d.nodes) == {"n1", "n2"}
    assert all(j.status is JobStatus.DONE for j in jobs(sm, "a"))


def test_stops_and_forgotten_jobs_are_noted() -> None:
    sm = world(host("n1", gpus=1), submit("busy", task("H100:1"), at=1))
    schedule(sm, now=2)
    sm.apply_command(submit("w", task("H100:1"), at=3))
    waiting = jobs(sm, "w")[0].job_id
    c = sm.feed.cursor()
    sm.apply_command(StopRun(at=4, run_name="w"))
    changes = sm.feed.since(c)
    assert changes is not None and changes.jobs == [waiting]
    c = sm.feed.cursor()
    sm.apply_command(PruneRuns(at=5, keep=0))
    assert sm.feed.since(c) is not None  # finished jobs are in no index: nothing to note


def test_restore_starts_a_new_epoch() -> None:
    sm = world(host("n1"), submit("a", task("H100:1"), at=1))
    c = sm.feed.cursor()
    snap = sm.snapshot()
    assert b"feed" not in snap  # derived: never snapshotted
    sm.restore(snap)
    assert sm.feed.since(c) is None  # readers rebuild
    after = sm.feed.cursor()
    assert after.epoch == c.epoch + 1 and (after.jobs, after.nodes, after.runs) == (0, 0, 0)
    sm.apply_command(submit("b", task("H100:1"), at=2))
    changes = sm.feed.since(after)
    assert changes is not None and changes.jobs == [j.job_id for j in jobs(sm, "b")]
    fresh = StateMachine()
    fresh.restore(snap)
    assert fresh.waiting_count == 1 and len(fresh.waiting_jobs()) == 1
