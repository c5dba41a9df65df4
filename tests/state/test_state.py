"""The replicated state machine and the placement seed, pure and deterministic."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from meshgpu.config import parse_config
from meshgpu.config.render import to_json
from meshgpu.scheduler import plan
from meshgpu.state import (
    AssignJobs,
    GPUHealth,
    JobFinished,
    JobStarted,
    JobStatus,
    JobTerminationReason,
    PruneRuns,
    RegisterNode,
    RunStatus,
    SetGPUHealth,
    SetPendingReasons,
    StateMachine,
    StopRun,
    SubmitRun,
    encode,
)
from meshgpu.testing import host

_ids = itertools.count()


def node(node_id: str = "n1", gpus: int = 8, name: str = "H100", mem_gb: int = 80) -> RegisterNode:
    return host(node_id, gpus, name, mem_gb)


def submit(name: str, yaml_text: str, at: float = 2.0, request_id: str | None = None) -> SubmitRun:
    cfg = to_json(parse_config(yaml_text))
    return SubmitRun(
        at=at,
        request_id=request_id or f"req-{next(_ids)}",
        run_id=f"id-{name}",
        run_name=name,
        config=cfg,
    )


def task(gpus: str, nodes: int = 1, priority: int = 0) -> str:
    return f"type: task\ncommands: [run]\nnodes: {nodes}\npriority: {priority}\nresources:\n  gpu: {gpus}\n"


def apply(sm: StateMachine, *cmds: object) -> list[object]:
    start = sm.applied_index
    return sm.apply([(start + i + 1, encode(c)) for i, c in enumerate(cmds)])


def schedule(sm: StateMachine, at: float = 3.0) -> dict[str, object]:
    p = plan(sm)
    res = apply(
        sm,
        AssignJobs(at=at, assignments=p.assignments),
        SetPendingReasons(at=at, reasons=p.pending),
    )
    return res[0].value


def start_all(sm: StateMachine, at: float = 4.0) -> None:
    for j in list(sm.jobs.values()):
        if j.status is JobStatus.PROVISIONING:
            apply(sm, JobStarted(at=at, job_id=j.job_id, epoch=j.epoch, started_at=at))


def finish(
    sm: StateMachine,
    run: str,
    reason: JobTerminationReason = JobTerminationReason.DONE_BY_RUNNER,
    at: float = 9.0,
) -> None:
    for j in sm.run_jobs(sm.runs[run]):
        apply(sm, JobFinished(at=at, job_id=j.job_id, epoch=j.epoch, reason=reason, exit_code=0))


def test_two_4gpu_tasks_get_disjoint_gpus_third_waits_then_runs() -> None:
    sm = StateMachine()
    apply(sm, node(), submit("a", task("4")), submit("b", task("4")), submit("c", task("4"), at=3))
    schedule(sm)
    a, b, c = (sm.run_jobs(sm.runs[x])[0] for x in "abc")
    assert a.status is b.status is JobStatus.PROVISIONING and c.status is JobStatus.SUBMITTED
    assert not set(a.gpu_indices) & set(b.gpu_indices) and len(a.gpu_indices) == 4
    assert set(a.gpu_indices) in ({0, 1, 2, 3}, {4, 5, 6, 7})  # one NUMA node each
    assert "largest free: 0 on n1" in c.why_pending
    start_all(sm)
    assert sm.runs["a"].status is RunStatus.RUNNING
    finish(sm, "a")
    assert sm.runs["a"].status is RunStatus.DONE
    schedule(sm)
    assert c.status is JobStatus.PROVISIONING and set(c.gpu_indices) == set(a.gpu_indices)


def test_an_unhealthy_gpu_takes_no_new_work_until_it_recovers() -> None:
    sm = StateMachine()
    apply(sm, node("n1", 2))
    schedule(sm)  # the scheduler's index has seen the healthy host
    res = apply(
        sm,
        SetGPUHealth(
            at=2.0, node_id="n1", gpus=[GPUHealth(index=0, healthy=False, reason="XID 79")]
        ),
    )
    assert res[0].ok and res[0].value == [0]
    gpu0 = sm.nodes["n1"].gpus[0]
    assert (gpu0.healthy, gpu0.health_reason) == (False, "XID 79")
    # Repeating a verdict changes nothing; an unknown host is refused.
    version = sm.demand_version
    again = SetGPUHealth(
        at=2.1, node_id="n1", gpus=[GPUHealth(index=0, healthy=False, reason="XID 79")]
    )
    assert apply(sm, again)[0].value == []
    assert sm.demand_version == version
    ghost = SetGPUHealth(at=2.2, node_id="nope", gpus=[GPUHealth(index=0, healthy=False)])
    assert apply(sm, ghost)[0].code == "not_found"
    # One GPU left: a 1-GPU task lands on GPU 1, a 2-GPU task waits.
    apply(sm, submit("one", task("1")), submit("two", task("2"), at=3))
    schedule(sm)
    assert sm.run_jobs(sm.runs["one"])[0].gpu_indices == [1]
    assert sm.run_jobs(sm.runs["two"])[0].status is JobStatus.SUBMITTED
    # A stale decision naming the faulty GPU is refused at apply.
    two = sm.run_jobs(sm.runs["two"])[0]
    stale = AssignJobs(
        at=3.5,
        assignments=[{"job_id": two.job_id, "node_id": "n1", "gpu_indices": [0]}],  # type: ignore[list-item]
    )
    assert apply(sm, stale)[0].value["refused"]
    # Re-registering (a restart) does not clear the fault; the host's report does.
    apply(sm, node("n1", 2))
    assert not sm.nodes["n1"].gpus[0].healthy
    apply(sm, SetGPUHealth(at=4.0, node_id="n1", gpus=[GPUHealth(index=0, healthy=True)]))
    assert sm.nodes["n1"].gpus[0].healthy and not sm.nodes["n1"].gpus[0].health_reason
    finish(sm, "one")
    schedule(sm)
    assert sorted(sm.run_jobs(sm.runs["two"])[0].gpu_indices) == [0, 1]
    # Restored from a snapshot, the verdicts are there.
    apply(sm, SetGPUHealth(at=5.0, node_id="n1", gpus=[GPUHealth(index=1, healthy=False)]))
    copy = StateMachine()
    copy.restore(sm.snapshot())
    assert [g.healthy for g in copy.nodes["n1"].gpus] == [True, False]


def test_gang_is_placed_whole_or_not_at_all() -> None:
    sm = StateMachine()
    apply(
        sm,
        node("n1", 8),
        node("n2", 8),
        submit("big", task("8", nodes=3)),
        submit("two", task("8", nodes=2), at=3),
    )
    schedule(sm)
    assert all(j.status is JobStatus.SUBMITTED for j in sm.run_jobs(sm.runs["big"]))
    # "big" can never fit (3 nodes of 8 on a 2-node mesh)? It can fit each job on some host, but
    # not all at once: it waits whole, and it reserves the hosts it needs.
    assert all(j.why_pending for j in sm.run_jobs(sm.runs["big"]))
    assert all(j.status is JobStatus.SUBMITTED for j in sm.run_jobs(sm.runs["two"]))
    assert "earlier or higher-priority runs are ahead" in sm.run_jobs(sm.runs["two"])[0].why_pending


def test_priority_and_backfill_without_delaying_the_head() -> None:
    sm = StateMachine()
    apply(sm, node("n1", 8), node("small", 2, name="T4", mem_gb=16))
    apply(sm, submit("hog", task("H100:6"), at=1.0), submit("running", task("H100:4"), at=1.5))
    schedule(sm)
    # hog (first) took 6 H100s; running could not fit and reserves n1.
    apply(
        sm, submit("urgent", task("H100:8", priority=50), at=5), submit("t4job", task("T4:1"), at=6)
    )
    schedule(sm, at=7)
    assert sm.run_jobs(sm.runs["urgent"])[0].status is JobStatus.SUBMITTED
    assert sm.run_jobs(sm.runs["t4job"])[0].status is JobStatus.PROVISIONING  # backfilled elsewhere
    finish(sm, "hog")
    schedule(sm, at=10)
    assert sm.run_jobs(sm.runs["urgent"])[0].status is JobStatus.PROVISIONING  # priority first
    assert sm.run_jobs(sm.runs["running"])[0].status is JobStatus.SUBMITTED


def test_no_host_can_ever_run_it_says_why() -> None:
    sm = StateMachine()
    apply(
        sm,
        node(),
        submit("x", task("A100:1")),
        submit("y", "type: task\nimage: ubuntu\ncommands: [a]\n"),
    )
    schedule(sm)
    assert (
        "no host can ever run it: n1 has 0 matching GPUs"
        in sm.run_jobs(sm.runs["x"])[0].why_pending
    )
    assert "no container runtime" in sm.run_jobs(sm.runs["y"])[0].why_pending


def test_idempotent_submit_and_name_in_use() -> None:
    sm = StateMachine()
    r1, r2, r3 = apply(
        sm,
        submit("a", task("1"), request_id="R"),
        submit("a", task("1"), request_id="R"),
        submit("a", task("1")),
    )
    assert r1.ok and r2.ok and r2.value == "a" and len(sm.runs) == 1 and len(sm.jobs) == 1
    assert not r3.ok and r3.code == "name_in_use"


def test_fencing_by_epoch_and_stop_flows() -> None:
    sm = StateMachine()
    apply(sm, node(), submit("a", task("1")), submit("queued", task("8"), at=3))
    schedule(sm)
    job = sm.run_jobs(sm.runs["a"])[0]
    stale = apply(sm, JobStarted(at=4, job_id=job.job_id, epoch=job.epoch - 1, started_at=4))[0]
    assert not stale.ok and stale.code == "stale" and job.status is JobStatus.PROVISIONING
    start_all(sm)
    apply(sm, StopRun(at=5, run_name="a"), StopRun(at=5, run_name="queued", abort=True))
    assert job.status is JobStatus.TERMINATING and job.stop_requested == "stop"
    assert sm.runs["queued"].status is RunStatus.TERMINATED
    apply(
        sm,
        JobFinished(
            at=6,
            job_id=job.job_id,
            epoch=job.epoch,
            reason=JobTerminationReason.CONTAINER_EXITED_WITH_ERROR,
            exit_code=143,
        ),
    )
    assert job.termination_reason is JobTerminationReason.TERMINATED_BY_USER
    assert sm.runs["a"].status is RunStatus.TERMINATED
    assert not apply(sm, StopRun(at=7, run_name="nope"))[0].ok


def test_failure_of_one_gang_member_stops_the_rest() -> None:
    sm = StateMachine()
    apply(sm, node("n1"), node("n2"), submit("dist", task("8", nodes=2)))
    schedule(sm)
    start_all(sm)
    j0, j1 = sm.run_jobs(sm.runs["dist"])
    apply(
        sm,
        JobFinished(
            at=5,
            job_id=j0.job_id,
            epoch=j0.epoch,
            reason=JobTerminationReason.CONTAINER_EXITED_WITH_ERROR,
            exit_code=1,
        ),
    )
    assert sm.runs["dist"].status is RunStatus.TERMINATING and j1.status is JobStatus.TERMINATING
    apply(
        sm,
        JobFinished(
            at=6, job_id=j1.job_id, epoch=j1.epoch, reason=JobTerminationReason.TERMINATED_BY_USER
        ),
    )
    assert sm.runs["dist"].status is RunStatus.FAILED


def test_snapshot_restore_and_prune() -> None:
    sm = StateMachine()
    apply(sm, node(), *(submit(f"r{i}", task("1"), at=i) for i in range(5)))
    schedule(sm)
    start_all(sm)
    for i in range(3):
        finish(sm, f"r{i}", at=10 + i)
    copy = StateMachine()
    copy.restore(sm.snapshot())
    assert copy.snapshot() == sm.snapshot()
    assert apply(copy, PruneRuns(at=20, keep=1))[0].value == 2
    assert sorted(copy.runs) == ["r2", "r3", "r4"]
    assert apply(copy, PruneRuns(at=10_000_000, keep=100, max_age_s=60))[0].value == 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["submit", "finish", "stop", "schedule"]),
            st.integers(0, 9),
            st.sampled_from(["1", "2", "4", "8", "H100:3", "0"]),
            st.integers(1, 2),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_property_no_gpu_is_ever_allocated_twice(ops: list[tuple[str, int, str, int]]) -> None:
    sm = StateMachine()
    apply(sm, node("n1"), node("n2", 4))
    t = 10.0
    for op, k, gpus, nodes in ops:
        t += 1
        name = f"run{k}"
        if op == "submit":
            apply(sm, submit(name, task(gpus, nodes=nodes), at=t))
        elif op == "stop":
            apply(sm, StopRun(at=t, run_name=name))
        elif op == "finish" and name in sm.runs:
            for j in sm.run_jobs(sm.runs[name]):
                if j.status.holds_resources():
                    apply(
                        sm,
                        JobFinished(
                            at=t,
                            job_id=j.job_id,
                            epoch=j.epoch,
                            reason=JobTerminationReason.DONE_BY_RUNNER,
                        ),
                    )
        else:
            schedule(sm, at=t)
            start_all(sm, at=t)
        for n in sm.nodes:
            held = [
                i
                for j in sm.jobs.values()
                if j.node_id == n and j.status.holds_resources()
                for i in j.gpu_indices
            ]
            assert len(held) == len(set(held)), "a GPU is held twice"
        for run in sm.runs.values():
            jobs = sm.run_jobs(run)
            placed = [j.node_id is not None for j in jobs]
            assert all(placed) or not any(placed), "a gang was half placed"
    p = plan(sm)
    waiting = {j.job_id for j in sm.waiting_jobs()} - {a.job_id for a in p.assignments}
    assert waiting <= set(p.pending), "a waiting job has no reason"


def test_a_snapshot_view_encodes_the_state_as_it_was_when_taken() -> None:
    """The Raft node takes the view in its owner task and encodes it in a worker thread while
    the state moves on: what is encoded is the state at the view, whatever is applied after."""
    sm = StateMachine()
    apply(sm, node("n1", 8))
    apply(sm, submit("a", task("H100:2", nodes=2)), submit("b", task("H100:1")))
    schedule(sm)
    expected = sm.snapshot()
    view = sm.snapshot_view()
    start_all(sm)
    apply(sm, submit("c", task("H100:1")), StopRun(at=5, run_name="a"))
    schedule(sm)
    assert sm.snapshot() != expected
    assert view() == expected
    back = StateMachine()
    back.restore(view())
    assert set(back.runs) == {"a", "b"} and back.snapshot() == expected
