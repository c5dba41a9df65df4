"""Run policies in the replicated state: ``retry`` (resubmission, window, backoff), the jobs of a
lost host, ``stop_criteria: master-done`` and ``priority`` changed in place."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from meshgpu.api.views import run_view
from meshgpu.scheduler import SchedulerIndex, plan
from meshgpu.scheduler.queue import WaitQueue
from meshgpu.state import (
    JobFinished,
    JobStatus,
    JobTerminationReason,
    Preemption,
    PreemptJobs,
    RunStatus,
    RunTerminationReason,
    SetRunPriority,
    StateMachine,
    StopRun,
)
from meshgpu.state.cluster import NodeUnreachable, Replicated, encode_cluster
from meshgpu.state.commands import encode
from tests.scheduler._world import finish, host, jobs, schedule, status, submit, task, world


def queue_of(sm: StateMachine) -> WaitQueue:
    """The scheduler's wait queue of ``sm``, up to date."""
    index = SchedulerIndex.shared(sm)
    index.sync(sm)
    return index.queue


ERROR = JobTerminationReason.CONTAINER_EXITED_WITH_ERROR
RUNNING = {JobStatus.RUNNING}


def fail(sm: StateMachine, job: Any, at: float, reason: JobTerminationReason = ERROR) -> None:
    code = 1 if reason is ERROR else None
    sm.apply_command(
        JobFinished(at=at, job_id=job.job_id, epoch=job.epoch, reason=reason, exit_code=code)
    )


def retry(events: list[str] | None = None, duration: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if events is not None:
        out["on_events"] = events
    if duration is not None:
        out["duration"] = duration
    return out


def test_retry_on_error_resubmits_then_the_run_finishes() -> None:
    sm = world(host("n1"), submit("r", task("H100:1") | {"retry": retry(["error"])}, at=0))
    schedule(sm, now=1)
    [first] = jobs(sm, "r")
    fail(sm, first, at=10)
    [again] = jobs(sm, "r")
    assert again.submission_num == 1 and again.status is JobStatus.SUBMITTED
    assert again.job_id != first.job_id and sm.runs["r"].replaced_job_ids == [first.job_id]
    assert first.status is JobStatus.FAILED and first.exit_code == 1
    assert sm.runs["r"].status is RunStatus.SUBMITTED
    view = run_view(sm.runs["r"], sm)
    assert view["status_message"] == "retrying" and view["jobs"][0]["submission_num"] == 1
    assert "retrying after error: job 0 ended container_exited_with_error" in again.why_pending
    schedule(sm, now=11)  # the first retry of a streak may start at once
    assert status(sm, "r") == RUNNING
    finish(sm, "r", at=20)
    run = sm.runs["r"]
    assert (
        run.status is RunStatus.DONE
        and run.termination_reason is RunTerminationReason.ALL_JOBS_DONE
    )
    assert run_view(run, sm)["status_message"] == "done"


@pytest.mark.parametrize(
    "policy",
    [None, retry(["interruption"]), retry(["no-capacity"])],
    ids=["no-retry", "interruption-only", "no-capacity-only"],
)
def test_a_failure_the_policy_does_not_cover_fails_the_run(policy: dict[str, Any] | None) -> None:
    config = task("H100:1") | ({"retry": policy} if policy is not None else {})
    sm = world(host("n1"), submit("r", config, at=0))
    schedule(sm, now=1)
    fail(sm, jobs(sm, "r")[0], at=5)
    run = sm.runs["r"]
    assert len(run.job_ids) == 1 and not run.replaced_job_ids
    assert (
        run.status is RunStatus.FAILED and run.termination_reason is RunTerminationReason.JOB_FAILED
    )


def test_retry_true_covers_every_event() -> None:
    sm = world(host("n1"), submit("r", task("H100:1") | {"retry": True}, at=0))
    schedule(sm, now=1)
    fail(sm, jobs(sm, "r")[0], at=5)
    assert jobs(sm, "r")[0].submission_num == 1


def test_the_retry_window_and_the_backoff() -> None:
    sm = world(host("n1"), submit("r", task("H100:1") | {"retry": retry(["error"], 60)}, at=0))
    schedule(sm, now=4)
    # It ran 96 s (longer than the window) before failing: a new streak begins at 100.
    fail(sm, jobs(sm, "r")[0], at=100)
    [j1] = jobs(sm, "r")
    assert (j1.retry_since, j1.retry_attempt, j1.not_before) == (100, 1, 100)
    schedule(sm, now=101)
    # Ran 8 s: the same streak, second attempt, which backs off 15 s.
    fail(sm, jobs(sm, "r")[0], at=110)
    [j2] = jobs(sm, "r")
    assert (j2.submission_num, j2.retry_since, j2.retry_attempt, j2.not_before) == (2, 100, 2, 125)
    p, _ = schedule(sm, now=111)
    assert status(sm, "r") == {JobStatus.SUBMITTED} and p.wake_at == 125
    assert j2.why_pending == "retrying (attempt 2): backing off 15s after repeated failures"
    # Backing off blocks nobody behind it.
    sm.apply_command(submit("other", task("H100:1"), at=112))
    schedule(sm, now=113)
    assert status(sm, "other") == RUNNING and status(sm, "r") == {JobStatus.SUBMITTED}
    p, _ = schedule(sm, now=126)
    assert status(sm, "r") == RUNNING and p.wake_at is None
    # 70 s after the streak began, and it never ran 60 s since: the retries are over.
    fail(sm, jobs(sm, "r")[0], at=170)
    run = sm.runs["r"]
    assert run.status is RunStatus.FAILED
    assert run.termination_reason is RunTerminationReason.RETRY_LIMIT_EXCEEDED
    assert len(run.replaced_job_ids) == 2


def test_a_failed_gang_member_stops_and_resubmits_the_whole_gang() -> None:
    sm = world(
        host("n1"),
        host("n2"),
        submit("dist", task("H100:8", nodes=2) | {"retry": retry(["error"])}, at=0),
    )
    schedule(sm, now=1)
    j0, j1 = jobs(sm, "dist")
    fail(sm, j1, at=5)
    assert j0.status is JobStatus.TERMINATING and j0.stop_requested == "server"
    assert sm.runs["dist"].status is RunStatus.PENDING  # being retried (dstack)
    assert run_view(sm.runs["dist"], sm)["status_message"] == "retrying"
    assert [j.submission_num for j in jobs(sm, "dist")] == [0, 0]  # not before all stopped
    # The runner reports the stopped master as terminated (or exit 143): meshgpu stopped it.
    fail(sm, j0, at=6, reason=JobTerminationReason.TERMINATED_BY_USER)
    assert j0.termination_reason is JobTerminationReason.TERMINATED_BY_SERVER
    fresh = jobs(sm, "dist")
    assert [j.submission_num for j in fresh] == [1, 1] and status(sm, "dist") == {
        JobStatus.SUBMITTED
    }
    schedule(sm, now=7)
    assert status(sm, "dist") == RUNNING
    finish(sm, "dist", at=20)
    assert sm.runs["dist"].status is RunStatus.DONE


def test_without_retry_a_gang_failure_stops_the_rest_and_fails_the_run() -> None:
    sm = world(host("n1"), host("n2"), submit("dist", task("H100:8", nodes=2), at=0))
    schedule(sm, now=1)
    j0, j1 = jobs(sm, "dist")
    fail(sm, j0, at=5)
    assert sm.runs["dist"].status is RunStatus.TERMINATING and j1.stop_requested == "server"
    fail(sm, j1, at=6, reason=JobTerminationReason.TERMINATED_BY_USER)
    assert j1.termination_reason is JobTerminationReason.TERMINATED_BY_SERVER
    assert sm.runs["dist"].termination_reason is RunTerminationReason.JOB_FAILED


def test_the_jobs_of_a_lost_host_are_resubmitted_elsewhere() -> None:
    sm = world(
        host("n1"),
        host("n2"),
        submit("r", task("H100:8") | {"retry": retry(["interruption"])}, at=0),
        submit("e", task("H100:8") | {"retry": retry(["error"])}, at=1),
    )
    schedule(sm, now=3)
    for node in ("n1", "n2"):
        held = {j.job_id for j in sm.jobs_on_node(node)}
        sm.set_node_status(node, "dead")
        ended = sm.fail_node_jobs(node, JobTerminationReason.INSTANCE_UNREACHABLE, 10, "gone")
        assert set(ended) == held and len(held) == 1
    [again] = jobs(sm, "r")
    assert again.submission_num == 1 and again.status is JobStatus.SUBMITTED
    old = sm.jobs[sm.runs["r"].replaced_job_ids[0]]
    assert old.termination_reason is JobTerminationReason.INSTANCE_UNREACHABLE
    assert old.termination_message == "gone"
    # A lost host is an interruption, not an error: retry on error alone does not cover it.
    assert sm.runs["e"].status is RunStatus.FAILED
    sm.apply_command(host("n3"))
    schedule(sm, now=11)
    assert status(sm, "r") == RUNNING and jobs(sm, "r")[0].node_id == "n3"


def test_node_unreachable_goes_through_fail_node_jobs() -> None:
    rep = Replicated()
    cmds = [
        host("n1"),
        host("n2"),
        submit("dist", task("H100:8", nodes=2) | {"retry": retry(["interruption"])}, at=0),
    ]
    rep.apply([(i + 1, encode(c)) for i, c in enumerate(cmds)])
    sm = rep.jobs
    schedule(sm, now=1)
    victim = jobs(sm, "dist")[0]
    other = jobs(sm, "dist")[1]
    index = sm.applied_index + 1
    rep.apply([(index, encode_cluster(NodeUnreachable(at=5, node_id=victim.node_id)))])
    assert sm.nodes[victim.node_id].status == "dead"
    assert victim.termination_reason is JobTerminationReason.INSTANCE_UNREACHABLE
    assert other.status is JobStatus.TERMINATING and sm.runs["dist"].status is RunStatus.PENDING
    fail(sm, other, at=6, reason=JobTerminationReason.TERMINATED_BY_USER)
    assert [j.submission_num for j in jobs(sm, "dist")] == [1, 1]


def test_a_user_stop_wins_over_a_resubmission() -> None:
    sm = world(host("n1"), host("n2"), submit("d", task("H100:8", nodes=2) | {"retry": True}, at=0))
    schedule(sm, now=1)
    j0, j1 = jobs(sm, "d")
    fail(sm, j0, at=5)
    sm.apply_command(StopRun(at=6, run_name="d"))
    assert j1.stop_requested == "stop" and not sm.runs["d"].retrying
    fail(sm, j1, at=7, reason=JobTerminationReason.TERMINATED_BY_USER)
    run = sm.runs["d"]
    assert run.status is RunStatus.TERMINATED and not run.replaced_job_ids


def test_master_done_stops_the_workers_and_the_run_is_done() -> None:
    sm = world(
        host("n1"),
        host("n2"),
        host("n3"),
        submit("md", task("H100:8", nodes=3, stop_criteria="master-done"), at=0),
        submit("ad", task("H100:8", nodes=2), at=1),
    )
    schedule(sm, now=2)
    m, w1, w2 = jobs(sm, "md")
    finish_one = JobTerminationReason.DONE_BY_RUNNER
    fail(sm, w2, at=3, reason=finish_one)  # a worker done first changes nothing
    assert sm.runs["md"].status is RunStatus.RUNNING and w1.status is JobStatus.RUNNING
    fail(sm, m, at=4, reason=finish_one)
    assert w1.status is JobStatus.TERMINATING and w1.stop_requested == "server"
    assert sm.runs["md"].status is RunStatus.TERMINATING
    fail(sm, w1, at=5, reason=JobTerminationReason.TERMINATED_BY_USER)
    run = sm.runs["md"]
    assert (
        run.status is RunStatus.DONE
        and run.termination_reason is RunTerminationReason.ALL_JOBS_DONE
    )
    assert w1.termination_reason is JobTerminationReason.TERMINATED_BY_SERVER


def test_all_done_waits_for_every_job() -> None:
    sm = world(host("n1"), host("n2"), submit("ad", task("H100:8", nodes=2), at=0))
    schedule(sm, now=1)
    m, w = jobs(sm, "ad")
    fail(sm, m, at=3, reason=JobTerminationReason.DONE_BY_RUNNER)
    assert sm.runs["ad"].status is RunStatus.RUNNING and w.status is JobStatus.RUNNING
    fail(sm, w, at=4, reason=JobTerminationReason.DONE_BY_RUNNER)
    assert sm.runs["ad"].status is RunStatus.DONE


def test_priority_changed_in_place_reorders_the_queue() -> None:
    sm = world(
        host("n1"),
        submit("hog", task("H100:8"), at=0),
        submit("a", task("H100:8"), at=1),
        submit("b", task("H100:8"), at=2),
    )
    schedule(sm, now=3)
    assert status(sm, "a") == status(sm, "b") == {JobStatus.SUBMITTED}
    res = sm.apply_command(SetRunPriority(at=4, run_name="b", priority=10))
    assert res.ok and sm.runs["b"].priority == 10 and sm.runs["b"].config["priority"] == 10
    assert [p for p, _ in queue_of(sm).by_priority()] == [10, 0]
    finish(sm, "hog", at=5)
    schedule(sm, now=6)
    assert status(sm, "b") == RUNNING and status(sm, "a") == {JobStatus.SUBMITTED}
    # Back down: "a" keeps its place (its submission time) among equals.
    sm.apply_command(submit("c", task("H100:8"), at=7))
    sm.apply_command(SetRunPriority(at=8, run_name="a", priority=0))
    finish(sm, "b", at=9)
    schedule(sm, now=10)
    assert status(sm, "a") == RUNNING and status(sm, "c") == {JobStatus.SUBMITTED}
    bad = sm.apply_command(SetRunPriority(at=11, run_name="b", priority=5))
    assert not bad.ok and bad.code == "finished"
    missing = sm.apply_command(SetRunPriority(at=11, run_name="nope", priority=5))
    assert not missing.ok and missing.code == "not_found"
    with pytest.raises(ValidationError):
        SetRunPriority(at=12, run_name="a", priority=101)


def test_a_running_run_raised_above_its_preemptor_is_spared() -> None:
    sm = world(host("n1"), submit("victim", task("H100:8", preemptible=True), at=0))
    schedule(sm, now=1)
    node = jobs(sm, "victim")[0].node_id
    sm.apply_command(submit("hi", task("H100:8", priority=50), at=2))
    before = sm.feed.cursor()
    sm.apply_command(SetRunPriority(at=3, run_name="victim", priority=60))
    changes = sm.feed.since(before)
    # The scheduler's per-host cache of the node is refreshed.
    assert changes is not None and node in changes.nodes and changes.runs == ["victim"]
    assert plan(sm, now=4).preemptions == []


def test_preemption_is_an_interruption_for_retry() -> None:
    sm = world(
        host("n1"),
        submit("v", task("H100:8", preemptible=True) | {"retry": retry(["interruption"])}, at=0),
    )
    schedule(sm, now=0)
    sm.apply_command(submit("hi", task("H100:8", priority=50), at=1))
    sm.apply_command(
        PreemptJobs(at=2, preemptions=[Preemption(by_run="hi", job_ids=[jobs(sm, "v")[0].job_id])])
    )
    assert sm.runs["v"].status is RunStatus.PENDING
    fail(sm, jobs(sm, "v")[0], at=3, reason=JobTerminationReason.TERMINATED_BY_USER)
    assert sm.jobs[sm.runs["v"].replaced_job_ids[0]].termination_reason is (
        JobTerminationReason.PREEMPTED
    )
    [again] = jobs(sm, "v")
    # Not a failure of its own: no backoff, and the retry window is left as it was.
    assert (again.submission_num, again.not_before, again.retry_since) == (1, 2, None)


def test_snapshot_restore_keeps_retries_in_flight_and_the_queue() -> None:
    sm = world(
        host("n1"),
        host("n2"),
        host("n3"),
        submit("dist", task("H100:8", nodes=2) | {"retry": retry(["error"], 600)}, at=0),
        submit("solo", task("H100:1") | {"retry": retry(["error"], 600)}, at=1),
        submit("late", task("H100:1"), at=2),
    )
    schedule(sm, now=3)
    fail(sm, jobs(sm, "dist")[0], at=5)  # the gang is stopping, to be resubmitted
    solo = jobs(sm, "solo")[0]
    fail(sm, solo, at=6)
    schedule(sm, now=7)
    fail(sm, jobs(sm, "solo")[0], at=8)  # second attempt: backing off
    sm.apply_command(SetRunPriority(at=9, run_name="late", priority=7))
    copy = StateMachine()
    copy.restore(sm.snapshot())
    assert copy.snapshot() == sm.snapshot()
    assert copy.runs["dist"].retrying == sm.runs["dist"].retrying
    assert sorted(queue_of(copy).gangs) == sorted(queue_of(sm).gangs)
    assert [p for p, _ in queue_of(copy).by_priority()] == [
        p for p, _ in queue_of(sm).by_priority()
    ]
    for s in (sm, copy):
        other = next(j for j in jobs(s, "dist") if j.status is JobStatus.TERMINATING)
        fail(s, other, at=10, reason=JobTerminationReason.TERMINATED_BY_USER)
        schedule(s, now=30)
    assert copy.snapshot() == sm.snapshot()
    assert [j.submission_num for j in jobs(copy, "dist")] == [1, 1]
    assert status(copy, "solo") == RUNNING


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["submit", "submit", "error", "error", "done", "lose", "stop"]
                + ["schedule", "schedule", "schedule", "priority"]
            ),
            st.integers(0, 5),
            st.integers(1, 2),
            st.sampled_from([["error"], ["error", "interruption"], None, ["interruption"]]),
        ),
        min_size=8,
        max_size=40,
    )
)
def test_property_a_replica_never_has_two_live_submissions(
    ops: list[tuple[str, int, int, list[str] | None]],
) -> None:
    sm = world(host("n1", 4), host("n2", 4), host("n3", 4))
    t = 10.0
    for op, k, nodes, events in ops:
        t += 7
        name = f"run{k}"
        live = sorted(
            (j for j in sm.active.values() if j.status.holds_resources()), key=lambda j: j.job_id
        )
        if op == "submit":
            config = task("H100:2", nodes=nodes, priority=k)
            if events is not None:
                config["retry"] = {"on_events": events, "duration": 60}
            sm.apply_command(submit(name, config, at=t))
        elif op in ("error", "done") and live:
            reason = ERROR if op == "error" else JobTerminationReason.DONE_BY_RUNNER
            fail(sm, live[k % len(live)], at=t, reason=reason)
        elif op == "lose":
            sm.fail_node_jobs(f"n{k % 3 + 1}", JobTerminationReason.INSTANCE_UNREACHABLE, t)
        elif op == "stop":
            sm.apply_command(StopRun(at=t, run_name=name))
        elif op == "priority":
            sm.apply_command(SetRunPriority(at=t, run_name=name, priority=100 - k))
        else:
            for j in list(sm.jobs.values()):
                if j.status is JobStatus.TERMINATING:  # the runners report their stops
                    fail(sm, j, at=t, reason=JobTerminationReason.TERMINATED_BY_USER)
            schedule(sm, now=t)
        for r in sm.runs.values():
            unfinished: dict[tuple[int, int], int] = {}
            for job_id in [*r.job_ids, *r.replaced_job_ids]:
                j = sm.jobs[job_id]
                if not j.status.is_finished():
                    key = (j.replica_num, j.job_num)
                    unfinished[key] = unfinished.get(key, 0) + 1
            assert all(n == 1 for n in unfinished.values()), "two live submissions of a job"
            placed = [sm.jobs[j].node_id is not None for j in r.job_ids]
            assert all(placed) or not any(placed), "a gang was half placed"
            if r.status.is_finished():
                assert all(sm.jobs[j].status.is_finished() for j in r.job_ids)
                assert not r.retrying
        held = [
            (j.node_id, g)
            for j in sm.jobs.values()
            if j.node_id and j.status.holds_resources()
            for g in j.gpu_indices
        ]
        assert len(held) == len(set(held)), "a GPU is held twice"
    copy = StateMachine()
    copy.restore(sm.snapshot())
    assert copy.snapshot() == sm.snapshot()
