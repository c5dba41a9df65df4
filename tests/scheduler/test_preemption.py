"""Preemption: opt-in, only when the preemptor then fits, cheapest victims first; and the
``PreemptJobs`` command that carries it out and requeues the victims."""

from __future__ import annotations

from meshgpu.scheduler import SchedulerPolicy, plan
from meshgpu.state import (
    JobFinished,
    JobStatus,
    JobTerminationReason,
    Preemption,
    PreemptJobs,
    RunStatus,
    StopRun,
)
from tests.scheduler._world import finish, host, jobs, schedule, status, submit, task, world

RUNNING = {JobStatus.RUNNING}


def stop_victims(sm, at: float = 50.0) -> None:  # type: ignore[no-untyped-def]
    """The runner reports each preempted job's end after its graceful stop."""
    for j in list(sm.jobs.values()):
        if j.status is JobStatus.TERMINATING:
            reason = JobTerminationReason.TERMINATED_BY_USER  # what a stopped runner reports
            sm.apply_command(JobFinished(at=at, job_id=j.job_id, epoch=j.epoch, reason=reason))


def test_preempts_the_cheapest_opted_in_victims_only_when_the_gang_then_fits() -> None:
    sm = world(
        host("n1", 8),
        host("n2", 8),
        submit("keep", task("H100:8", priority=5), at=0),  # not preemptible
        submit("low-big", task("H100:4", priority=1, preemptible=True), at=1),
        submit("low-small-old", task("H100:2", preemptible=True), at=2),
    )
    schedule(sm, now=2)
    sm.apply_command(submit("low-small-new", task("H100:2", preemptible=True), at=3))
    schedule(sm, now=3)
    assert all(status(sm, r) == RUNNING for r in ("keep", "low-big", "low-small-old"))
    assert status(sm, "low-small-new") == RUNNING  # the mesh is full now
    sm.apply_command(submit("urgent", task("H100:2", priority=50), at=10))
    p, res = schedule(sm, now=11)
    # Two GPUs free up cheapest by stopping one priority-0 2-GPU run: the newest of them.
    [pre] = p.preemptions
    assert pre.by_run == "urgent" and [sm.jobs[j].run_name for j in pre.job_ids] == [
        "low-small-new"
    ]
    assert status(sm, "low-small-new") == {JobStatus.TERMINATING}
    assert status(sm, "urgent") == {JobStatus.SUBMITTED}
    why = jobs(sm, "urgent")[0].why_pending
    assert why == "waiting for run(s) low-small-new to stop: it starts on their GPUs (preemption)"
    [target] = p.preemption_targets[("urgent", 0)]
    assert set(target.gpu_indices) == set(jobs(sm, "low-small-new")[0].gpu_indices)
    # While the victim stops, the next plans wait for it rather than preempt more.
    again = plan(sm, now=12)
    assert again.preemptions == [] and again.pending[jobs(sm, "urgent")[0].job_id] == why
    stop_victims(sm)
    schedule(sm, now=51)
    assert status(sm, "urgent") == RUNNING
    assert jobs(sm, "urgent")[0].gpu_indices == target.gpu_indices


def test_no_preemption_when_the_whole_gang_still_would_not_fit() -> None:
    sm = world(
        host("n1", 8),
        host("n2", 8),
        submit("pinned", task("H100:8"), at=0),
        submit("victim", task("H100:8", preemptible=True), at=1),
    )
    schedule(sm, now=1)
    sm.apply_command(submit("pair", task("H100:8", nodes=2, priority=90), at=2))
    p, _ = schedule(sm, now=3)
    assert p.preemptions == [] and status(sm, "victim") == RUNNING
    assert jobs(sm, "pair")[0].why_pending == "needs 2 hosts with 8xH100 each; 0 have room now"


def test_equal_priority_never_preempts_and_the_policy_switch() -> None:
    cmds = [host("n1", 8), submit("victim", task("H100:8", priority=10, preemptible=True), at=0)]
    sm = world(*cmds)
    schedule(sm, now=0)
    sm.apply_command(submit("same", task("H100:8", priority=10), at=1))
    p, _ = schedule(sm, now=2)
    assert p.preemptions == []
    sm = world(*cmds)
    schedule(sm, now=0)
    sm.apply_command(submit("higher", task("H100:8", priority=11), at=1))
    assert plan(sm, now=2, policy=SchedulerPolicy(preemption=False)).preemptions == []
    assert len(plan(sm, now=2).preemptions) == 1


def test_host_labels_opt_in_and_protect() -> None:
    sm = world(
        host("scavenger", 8, labels={"preemption": "always"}),
        host("safe", 8, labels={"preemption": "never"}),
        submit("a", task("H100:8"), at=0),
        submit("b", task("H100:8", preemptible=True), at=1),
    )
    schedule(sm, now=1)
    on = {jobs(sm, r)[0].node_id: r for r in ("a", "b")}
    sm.apply_command(submit("hi", task("H100:8", priority=60), at=2))
    p, _ = schedule(sm, now=3)
    # The run on the scavenger host goes, whichever it is; the one on "safe" never does.
    [pre] = p.preemptions
    assert [sm.jobs[j].run_name for j in pre.job_ids] == [on["scavenger"]]


def test_a_preempted_gang_stops_whole_and_requeues_with_retry() -> None:
    sm = world(
        host("n1", 8),
        host("n2", 8),
        submit("dist", task("H100:8", nodes=2, preemptible=True, retry=True), at=0),
    )
    schedule(sm, now=0)
    old = [j.job_id for j in jobs(sm, "dist")]
    sm.apply_command(submit("hi", task("H100:8", priority=50), at=1))
    p, _ = schedule(sm, now=2)
    [pre] = p.preemptions
    assert sorted(pre.job_ids) == sorted(old)  # the gang, not only the job on the target host
    first, second = jobs(sm, "dist")
    sm.apply_command(
        JobFinished(
            at=20,
            job_id=first.job_id,
            epoch=first.epoch,
            reason=JobTerminationReason.CONTAINER_EXITED_WITH_ERROR,  # SIGTERM'd: exit 143
            exit_code=143,
        )
    )
    assert first.termination_reason is JobTerminationReason.PREEMPTED
    # Not failed: pending (dstack's status for a run being retried) while the rest stops.
    assert sm.runs["dist"].status is RunStatus.PENDING
    assert second.status is JobStatus.TERMINATING
    stop_victims(sm, at=30)
    fresh = jobs(sm, "dist")
    assert [j.submission_num for j in fresh] == [1, 1] and {j.job_id for j in fresh}.isdisjoint(old)
    assert (
        status(sm, "dist") == {JobStatus.SUBMITTED}
        and sm.runs["dist"].status is RunStatus.SUBMITTED
    )
    assert sm.runs["dist"].replaced_job_ids == old
    assert sm.jobs[old[0]].termination_message == "preempted by run hi (priority 50)"
    schedule(sm, now=31)
    assert status(sm, "hi") == RUNNING and status(sm, "dist") == {JobStatus.SUBMITTED}
    finish(sm, "hi", at=40)
    schedule(sm, now=41)
    assert status(sm, "dist") == RUNNING  # back in the queue at its old place, and now running


def test_without_retry_a_preempted_run_ends_and_a_user_stop_wins() -> None:
    sm = world(host("n1", 8), submit("v", task("H100:8", preemptible=True), at=0))
    schedule(sm, now=0)
    sm.apply_command(submit("hi", task("H100:8", priority=50), at=1))
    schedule(sm, now=2)
    stop_victims(sm, at=3)
    [j] = jobs(sm, "v")
    assert (
        j.termination_reason is JobTerminationReason.PREEMPTED and j.status is JobStatus.TERMINATED
    )
    assert sm.runs["v"].status.is_finished()
    # With retry, but the user stops it while it is being preempted: it ends, no requeue.
    sm = world(host("n1", 8), submit("v", task("H100:8", preemptible=True, retry=True), at=0))
    schedule(sm, now=0)
    sm.apply_command(submit("hi", task("H100:8", priority=50), at=1))
    schedule(sm, now=2)
    sm.apply_command(StopRun(at=3, run_name="v"))
    stop_victims(sm, at=4)
    [j] = jobs(sm, "v")
    assert j.termination_reason is JobTerminationReason.TERMINATED_BY_USER
    assert sm.runs["v"].status is RunStatus.TERMINATED


def test_preempt_jobs_is_rechecked_at_apply() -> None:
    sm = world(
        host("n1", 8),
        submit("v", task("H100:4", priority=20, preemptible=True), at=0),
        submit("w", task("H100:4", preemptible=True), at=1),
    )
    schedule(sm, now=1)
    sm.apply_command(submit("mid", task("H100:8", priority=10), at=2))
    v, w = jobs(sm, "v")[0], jobs(sm, "w")[0]
    res = sm.apply_command(
        PreemptJobs(
            at=3,
            preemptions=[
                Preemption(by_run="mid", job_ids=[v.job_id, w.job_id]),
                Preemption(by_run="nobody", job_ids=[w.job_id]),
            ],
        )
    ).value
    assert res["preempted"] == [w.job_id]
    assert "does not outrank" in res["skipped"][v.job_id]
    assert v.status is JobStatus.RUNNING and w.status is JobStatus.TERMINATING
    again = sm.apply_command(
        PreemptJobs(at=4, preemptions=[Preemption(by_run="mid", job_ids=[w.job_id])])
    ).value
    assert again["preempted"] == [] and again["skipped"] == {w.job_id: "job no longer runs"}
