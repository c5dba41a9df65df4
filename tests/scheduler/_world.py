"""Builders for scheduler tests: hosts, runs, and applying a plan the way the leader does."""

from __future__ import annotations

import itertools
from typing import Any

from meshgpu.config.resources import parse_resources
from meshgpu.scheduler import Plan, SchedulerIndex, SchedulerPolicy, plan
from meshgpu.scheduler.capacity import HostIndex
from meshgpu.state import (
    AssignJobs,
    JobFinished,
    JobStarted,
    JobStatus,
    JobTerminationReason,
    PreemptJobs,
    SetPendingReasons,
    StateMachine,
    SubmitRun,
)
from meshgpu.testing import host as host  # the tests' host builder, re-exported

_ids = itertools.count()


_RES: dict[str, dict[str, Any]] = {}


def resources(gpu: Any = None, **more: Any) -> dict[str, Any]:
    """The normalized ``resources`` mapping a parsed configuration would carry."""
    raw = {"gpu": gpu, **more} if gpu is not None else dict(more)
    key = repr(sorted(raw.items()))
    if key not in _RES:
        _RES[key] = parse_resources(raw).model_dump(mode="json")
    return _RES[key]


def task(
    gpu: Any = None,
    *,
    nodes: int = 1,
    priority: int = 0,
    max_duration: int | None = None,
    preemptible: bool = False,
    retry: bool = False,
    **config: Any,
) -> dict[str, Any]:
    res = config.pop("resources", None) or resources(gpu)
    out: dict[str, Any] = {
        "type": "task",
        "commands": ["run"],
        "nodes": nodes,
        "priority": priority,
        "resources": res,
        **config,
    }
    if max_duration is not None:
        out["max_duration"] = max_duration
    if preemptible:
        out["preemptible"] = True
    if retry:
        out["retry"] = {"on_events": ["no-capacity", "interruption", "error"], "duration": 3600}
    return out


def submit(name: str, config: dict[str, Any], at: float = 2.0, project: str = "main") -> SubmitRun:
    return SubmitRun(
        at=at,
        request_id=f"req-{next(_ids)}",
        run_id=f"id-{name}",
        run_name=name,
        project=project,
        config=config,
    )


def world(*cmds: Any) -> StateMachine:
    sm = StateMachine()
    for c in cmds:
        sm.apply_command(c)
    return sm


def apply_plan(sm: StateMachine, p: Plan, at: float = 3.0, start: bool = True) -> dict[str, Any]:
    """Commit a plan as the leader does; assigned jobs start at once when ``start``."""
    out: dict[str, Any] = {}
    if p.preemptions:
        out["preempt"] = sm.apply_command(PreemptJobs(at=at, preemptions=p.preemptions)).value
    res = sm.apply_command(AssignJobs(at=at, assignments=p.assignments)).value
    out.update(res)
    if start:
        for job_id in res["accepted"]:
            job = sm.jobs[job_id]
            sm.apply_command(JobStarted(at=at, job_id=job_id, epoch=job.epoch, started_at=at))
    sm.apply_command(SetPendingReasons(at=at, reasons=p.pending))
    return out


def schedule(
    sm: StateMachine, now: float | None = 3.0, policy: SchedulerPolicy | None = None
) -> tuple[Plan, dict[str, Any]]:
    p = plan(sm, now=now, policy=policy)
    return p, apply_plan(sm, p, at=3.0 if now is None else now)


def jobs(sm: StateMachine, run: str) -> list[Any]:
    return sm.run_jobs(sm.runs[run])


def finish(
    sm: StateMachine,
    run: str,
    at: float = 9.0,
    reason: JobTerminationReason = JobTerminationReason.DONE_BY_RUNNER,
) -> None:
    for j in jobs(sm, run):
        if j.status.holds_resources():
            sm.apply_command(JobFinished(at=at, job_id=j.job_id, epoch=j.epoch, reason=reason))


def status(sm: StateMachine, run: str) -> set[JobStatus]:
    return {j.status for j in jobs(sm, run)}


def assert_same_index(kept: SchedulerIndex, fresh: SchedulerIndex) -> None:
    """Two scheduler indexes of the same state hold the same thing (``kept`` fed from the change
    feed, ``fresh`` typically rebuilt from scratch); both synced and no plan open."""
    q, f = kept.queue, fresh.queue
    assert len(q) == len(f)
    assert {k: [j.job_id for j in g.jobs] for k, g in q.gangs.items()} == {
        k: [j.job_id for j in g.jobs] for k, g in f.gangs.items()
    }
    assert {k: (c.order, set(c.job_ids)) for k, c in q.classes.items()} == {
        k: (c.order, set(c.job_ids)) for k, c in f.classes.items()
    }
    assert all(c.order for c in q.classes.values())
    assert [(p, [c.key for c in cs]) for p, cs in q.by_priority()] == [
        (p, [c.key for c in cs]) for p, cs in f.by_priority()
    ]
    for key, gang in q.gangs.items():
        other = f.gangs[key]
        assert gang.run is other.run and gang.cls.key == other.cls.key
        assert gang.order == other.order
    assert kept.project_gpus == fresh.project_gpus
    assert_same_hosts(kept.hosts, fresh.hosts)


def assert_same_hosts(index: HostIndex, fresh: HostIndex) -> None:
    """The host index kept across plans equals one built from scratch."""
    assert index.order == fresh.order == sorted(fresh.hosts)
    assert set(index.hosts) == set(fresh.hosts)
    for node_id, kept in index.hosts.items():
        other = fresh.hosts[node_id]
        assert (kept.free, kept.free_blocks, kept.units) == (
            other.free,
            other.free_blocks,
            other.units,
        )
        assert kept.node is other.node
        assert {j.job_id for j in kept.held} == {j.job_id for j in other.held}
        assert kept.reservation is None and kept.planned == []
        assert node_id in kept.cls.buckets[kept.units] and node_id in kept.cls.members
        assert kept.cls.sig == other.cls.sig
    assert sorted(index.by_end) == index.by_end
    assert index.by_end == fresh.by_end
    for cls in index.classes:
        assert cls.top == max((v for v, b in enumerate(cls.buckets) if b), default=-1)
        assert sum(len(b) for b in cls.buckets) == len(cls.members)
