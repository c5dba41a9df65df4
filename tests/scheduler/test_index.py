"""The scheduler's indexes (``SchedulerIndex``): fed from the state's change feed they equal
indexes rebuilt from scratch, after any sequence of commands; a restore or a feed that dropped
the reader's entries makes them rebuild; plans read them, never the state's internals."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from meshgpu.scheduler import Plan, SchedulerIndex, plan
from meshgpu.state import (
    GPUHealth,
    JobFinished,
    JobStarted,
    JobStatus,
    JobTerminationReason,
    PruneRuns,
    SetGPUHealth,
    SetRunPriority,
    StateMachine,
    StopRun,
)
from tests.scheduler._world import (
    apply_plan,
    assert_same_index,
    host,
    jobs,
    resources,
    schedule,
    submit,
    task,
    world,
)


def rebuilt(sm: StateMachine) -> SchedulerIndex:
    index = SchedulerIndex()
    index.sync(sm)
    return index


def decisions(p: Plan) -> Any:
    return (
        [(a.job_id, a.node_id, tuple(a.gpu_indices), a.blocks) for a in p.assignments],
        [(x.by_run, tuple(x.job_ids)) for x in p.preemptions],
        p.pending,
        p.wake_at,
    )


def test_restore_rebuilds_and_plans_the_same() -> None:
    sm = world(
        host("n1", gpus=2),
        submit("a", task("H100:1"), at=1),
        submit("b", task("H100:2", priority=5), at=2, project="q"),
    )
    kept = SchedulerIndex()
    schedule(sm, now=3)
    p = plan(sm, now=4, index=kept)
    assert kept.rebuilds == 1
    sm.apply_command(submit("c", task("H100:1"), at=5))
    kept.sync(sm)
    assert kept.rebuilds == 1  # fed incrementally
    sm.restore(sm.snapshot())
    kept.sync(sm)
    assert kept.rebuilds == 2  # a new epoch of the feed: rebuilt
    assert_same_index(kept, rebuilt(sm))
    assert len(kept.queue) == 2
    assert decisions(plan(sm, now=4, index=kept)) != decisions(p)  # "c" waits too now
    assert decisions(plan(sm, now=4, index=kept)) == decisions(plan(sm, now=4, index=rebuilt(sm)))


def test_a_reader_left_behind_by_the_feed_rebuilds() -> None:
    sm = world(host("n1", gpus=1))
    sm.feed.limit = 4
    kept = SchedulerIndex()
    kept.sync(sm)
    for i in range(6):
        sm.apply_command(submit(f"r{i}", task("H100:1"), at=1 + i))
    kept.sync(sm)
    assert kept.rebuilds == 2
    assert_same_index(kept, rebuilt(sm))


def test_the_index_of_another_state_is_rebuilt() -> None:
    one = world(host("n1"), submit("a", task("H100:1"), at=1))
    two = world(host("n2"), host("n3"))
    index = SchedulerIndex()
    index.sync(one)
    index.sync(two)
    assert (
        index.rebuilds == 2
        and len(index.queue) == 0
        and sorted(index.hosts.hosts)
        == [
            "n2",
            "n3",
        ]
    )


def test_priority_change_moves_the_gang_and_counts_fair_share() -> None:
    sm = world(
        host("n1", gpus=2),
        submit("hog", task("H100:2"), at=0, project="p"),
        submit("a", task("H100:1"), at=1, project="q"),
    )
    kept = SchedulerIndex()
    schedule(sm, now=2)
    kept.sync(sm)
    assert kept.project_gpus == {"p": 2}
    assert [p for p, _ in kept.queue.by_priority()] == [0]
    sm.apply_command(SetRunPriority(at=3, run_name="a", priority=7))
    kept.sync(sm)
    assert [p for p, _ in kept.queue.by_priority()] == [7]
    sm.apply_command(StopRun(at=4, run_name="hog"))
    for j in jobs(sm, "hog"):
        sm.apply_command(
            JobFinished(
                at=5, job_id=j.job_id, epoch=j.epoch, reason=JobTerminationReason.TERMINATED_BY_USER
            )
        )
    kept.sync(sm)
    assert kept.project_gpus == {}
    assert_same_index(kept, rebuilt(sm))


# -- random command sequences ----------------------------------------------------------------

GPU_SPECS = ["1", "2", "4", "8", "H100:1", "A100:2", "0"]

submit_st = st.tuples(
    st.just("submit"),
    st.sampled_from(GPU_SPECS),
    st.sampled_from([1, 1, 2]),
    st.sampled_from([0, 0, 5, 9]),
    st.sampled_from(["p", "q"]),
    st.booleans(),  # preemptible
    st.booleans(),  # retry
)
op_st = st.one_of(
    st.tuples(
        st.just("host"),
        st.integers(0, 3),
        st.sampled_from([0, 2, 4, 8]),
        st.sampled_from(["H100", "A100"]),
        st.sampled_from([None, None, 2]),
    ),
    st.tuples(st.just("health"), st.integers(0, 3), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("node_status"), st.integers(0, 3), st.sampled_from(["dead", "active"])),
    submit_st,
    st.tuples(st.just("job"), st.integers(0, 50), st.sampled_from(["start", "done", "error"])),
    st.tuples(st.just("stop"), st.integers(0, 50)),
    st.tuples(st.just("priority"), st.integers(0, 50), st.sampled_from([0, 3, 10])),
    st.tuples(st.just("prune"), st.integers(0, 3)),
    st.tuples(st.just("restore")),
)
# A round: submissions, a plan committed (its placements started or not), then other commands
# in any order, and maybe a sync of the kept index checked against one rebuilt from scratch.
round_st = st.tuples(
    st.lists(submit_st, max_size=4),
    st.booleans(),
    st.lists(op_st, max_size=5),
    st.booleans(),
)


def _pick(items: list[Any], k: int) -> Any:
    return items[k % len(items)] if items else None


def _step(sm: StateMachine, kept: SchedulerIndex, op: tuple[Any, ...], t: float) -> None:
    kind = op[0]
    if kind == "host":
        _, i, gpus, name, blocks = op
        sm.apply_command(host(f"h{i}", gpus, name, blocks=blocks if gpus else None, cpus=32, at=t))
    elif kind == "health":
        _, i, gpu, healthy = op
        if f"h{i}" in sm.nodes:
            verdict = GPUHealth(index=gpu, healthy=healthy, reason="" if healthy else "xid")
            sm.apply_command(SetGPUHealth(at=t, node_id=f"h{i}", gpus=[verdict]))
    elif kind == "node_status":
        _, i, status = op
        if f"h{i}" in sm.nodes:
            sm.set_node_status(f"h{i}", status)
            if status == "dead":
                sm.fail_node_jobs(f"h{i}", JobTerminationReason.INSTANCE_UNREACHABLE, t)
    elif kind == "submit":
        _, gpu, nodes, priority, project, preemptible, retry = op
        config = task(
            resources=resources(gpu),
            nodes=nodes,
            priority=priority,
            preemptible=preemptible,
            retry=retry,
            max_duration=600,
        )
        sm.apply_command(submit(f"r{len(sm.requests)}-{t}", config, at=t, project=project))
    elif kind == "plan":
        p = plan(sm, now=t, index=kept)
        res = apply_plan(sm, p, at=t, start=op[1])
        assert res["refused"] == {}
    elif kind == "job":
        _, k, what = op
        job = _pick(sorted(sm.active.values(), key=lambda j: j.job_id), k)
        if job is None or job.status is JobStatus.SUBMITTED:
            return
        if what == "start":
            sm.apply_command(JobStarted(at=t, job_id=job.job_id, epoch=job.epoch, started_at=t))
        else:
            reason = (
                JobTerminationReason.DONE_BY_RUNNER
                if what == "done"
                else JobTerminationReason.CONTAINER_EXITED_WITH_ERROR
            )
            sm.apply_command(JobFinished(at=t, job_id=job.job_id, epoch=job.epoch, reason=reason))
    elif kind in ("stop", "priority"):
        run = _pick(sorted(sm.runs), op[1])
        if run is None:
            return
        if kind == "stop":
            sm.apply_command(StopRun(at=t, run_name=run))
        else:
            sm.apply_command(SetRunPriority(at=t, run_name=run, priority=op[2]))
    elif kind == "prune":
        sm.apply_command(PruneRuns(at=t, keep=op[1]))
    elif kind == "restore":
        sm.restore(sm.snapshot())
    elif kind == "sync":
        kept.sync(sm)
        assert_same_index(kept, rebuilt(sm))


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.lists(round_st, min_size=1, max_size=8),
    st.sampled_from([200_000, 200_000, 6]),  # a small feed drops entries: readers rebuild
)
def test_fed_incrementally_equals_rebuilt(rounds: list[tuple[Any, ...]], limit: int) -> None:
    sm = world(host("h0", 8), host("h1", 4, "A100", 40))
    sm.feed.limit = limit
    kept = SchedulerIndex()
    t = 10.0
    for submits, start, ops, sync in rounds:
        for op in [*submits, ("plan", start), *ops, *([("sync",)] if sync else [])]:
            t += 7
            _step(sm, kept, op, t)
    kept.sync(sm)
    fresh = rebuilt(sm)
    event(f"rebuilds: {min(kept.rebuilds, 3)}")
    event(f"waiting: {min(len(kept.queue), 3)}, holding: {min(sum(map(len, sm.held.values())), 3)}")
    assert_same_index(kept, fresh)
    assert decisions(plan(sm, now=t + 1, index=kept)) == decisions(plan(sm, now=t + 1, index=fresh))
    assert_same_index(kept, rebuilt(sm))  # a plan leaves nothing behind
