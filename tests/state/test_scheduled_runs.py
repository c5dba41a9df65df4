"""Scheduled runs in the replicated state (dstack's ``schedule``): PENDING until the start the
state holds, started once by ``TriggerRun`` (a repeat is a no-op), back to PENDING after each
cycle unless the user stopped it, armed again by ``ScheduleRun``."""

from __future__ import annotations

from typing import Any

from meshgpu.api.views import run_view
from meshgpu.control.autoscaling import autoscaled
from meshgpu.scheduler import plan
from meshgpu.state import (
    JobStatus,
    JobTerminationReason,
    RunStatus,
    ScaleService,
    ScheduleRun,
    StateMachine,
    StopRun,
    TriggerRun,
    decode,
    encode,
)
from tests.scheduler._world import finish, host, jobs, schedule, submit, task, world

CRON = {"cron": ["*/5 * * * *"]}
T1 = 300.0  # the first start the submitter computed


def scheduled(name: str = "nightly", at: float = 2.0, **config: Any) -> Any:
    cmd = submit(name, task("H100:1", schedule=CRON, **config), at=at)
    return cmd.model_copy(update={"next_triggered_at": T1})


def trigger(sm: StateMachine, at: float, name: str = "nightly", when: float | None = None) -> Any:
    run = sm.runs[name]
    fired = when if when is not None else run.next_triggered_at
    return sm.apply_command(TriggerRun(at=at, run_name=name, triggered_at=fired))


def test_a_scheduled_run_waits_pending_with_its_next_start_and_nothing_to_place() -> None:
    sm = world(host("n1", 8), scheduled())
    run = sm.runs["nightly"]
    assert run.status is RunStatus.PENDING
    assert (run.waiting_since, run.next_triggered_at) == (2.0, T1)
    assert run.job_ids == [] and sm.waiting_count == 0
    assert plan(sm).assignments == []
    view = run_view(run, sm)
    assert view["next_triggered_at"] == T1 and view["schedule"] == ["*/5 * * * *"]


def test_the_trigger_starts_it_once_and_a_repeat_neither_doubles_nor_skips() -> None:
    sm = world(host("n1", 8), scheduled())
    assert not trigger(sm, 299.0, when=240.0).ok  # not the start it waits for
    assert sm.runs["nightly"].job_ids == []
    res = trigger(sm, 300.5)
    assert res.ok
    run = sm.runs["nightly"]
    assert run.status is RunStatus.SUBMITTED and run.last_triggered_at == T1
    assert run.waiting_since is None and run.next_triggered_at is None
    [job] = jobs(sm, "nightly")
    assert job.status is JobStatus.SUBMITTED and job.submitted_at == 300.5
    # A new leader proposes the same start again (it had not seen the first commit).
    again = sm.apply_command(TriggerRun(at=301.0, run_name="nightly", triggered_at=T1))
    assert not again.ok and again.code == "stale"
    assert len(run.job_ids) == 1 and sm.waiting_count == 1
    schedule(sm, now=302.0)
    assert jobs(sm, "nightly")[0].status is JobStatus.RUNNING


def test_after_its_jobs_finish_it_goes_back_to_pending_and_is_armed_again() -> None:
    sm = world(host("n1", 8), scheduled())
    trigger(sm, 300.0)
    schedule(sm, now=301.0)
    finish(sm, "nightly", at=400.0)
    run = sm.runs["nightly"]
    assert run.status is RunStatus.PENDING and run.termination_reason is None
    assert (run.waiting_since, run.next_triggered_at) == (400.0, None)
    assert not run.status.is_finished() and run.finished_at is None
    # The last cycle's jobs stay visible (ps, logs) until the next start.
    assert [j.status for j in jobs(sm, "nightly")] == [JobStatus.DONE]
    arm = ScheduleRun(at=401.0, run_name="nightly", waiting_since=400.0, next_triggered_at=600.0)
    assert sm.apply_command(arm).value == 600.0
    # A second leader's arming (same wait) changes nothing; one for an older wait is stale.
    late = arm.model_copy(update={"next_triggered_at": 900.0})
    assert sm.apply_command(late).value == 600.0
    stale = arm.model_copy(update={"waiting_since": 2.0})
    assert sm.apply_command(stale).code == "stale"
    assert run.next_triggered_at == 600.0
    trigger(sm, 600.0)
    [job] = jobs(sm, "nightly")
    assert job.submission_num == 1 and job.status is JobStatus.SUBMITTED
    assert run.replaced_job_ids == ["id-nightly-0-0-0"]


def test_a_failed_cycle_is_rescheduled_too() -> None:
    sm = world(host("n1", 8), scheduled())
    trigger(sm, 300.0)
    schedule(sm, now=301.0)
    finish(sm, "nightly", at=350.0, reason=JobTerminationReason.CONTAINER_EXITED_WITH_ERROR)
    run = sm.runs["nightly"]
    assert run.status is RunStatus.PENDING and run.waiting_since == 350.0


def test_a_multi_node_cycle_that_fails_goes_through_terminating_back_to_pending() -> None:
    sm = world(host("n1", 8), host("n2", 8), scheduled(nodes=2))
    trigger(sm, 300.0)
    schedule(sm, now=301.0)
    first, second = jobs(sm, "nightly")
    from tests.state.test_run_policies import fail

    fail(sm, first, at=310.0)  # the gang's other job is stopped: the run is terminating
    assert sm.runs["nightly"].status is RunStatus.TERMINATING
    finish(sm, "nightly", at=320.0, reason=JobTerminationReason.TERMINATED_BY_SERVER)
    assert sm.runs["nightly"].status is RunStatus.PENDING


def test_stopped_by_the_user_it_ends_whether_running_or_waiting() -> None:
    sm = world(host("n1", 8), scheduled("a"), scheduled("b"))
    trigger(sm, 300.0, name="a")
    schedule(sm, now=301.0)
    sm.apply_command(StopRun(at=310.0, run_name="a"))
    finish(sm, "a", at=311.0, reason=JobTerminationReason.TERMINATED_BY_USER)
    assert sm.runs["a"].status is RunStatus.TERMINATED
    sm.apply_command(StopRun(at=312.0, run_name="b"))  # waiting: ends at once
    run = sm.runs["b"]
    assert run.status is RunStatus.TERMINATED and run.next_triggered_at is None
    assert not sm.apply_command(TriggerRun(at=320.0, run_name="b", triggered_at=T1)).ok
    assert run.job_ids == []


def test_each_start_forgets_the_jobs_of_the_cycle_before_last() -> None:
    sm = world(host("n1", 8), scheduled())
    for cycle in range(3):
        trigger(sm, 300.0 + 1000 * cycle)
        schedule(sm, now=301.0 + 1000 * cycle)
        finish(sm, "nightly", at=400.0 + 1000 * cycle)
        arm = ScheduleRun(
            at=401.0 + 1000 * cycle,
            run_name="nightly",
            waiting_since=400.0 + 1000 * cycle,
            next_triggered_at=1300.0 + 1000 * cycle,
        )
        sm.apply_command(arm)
    trigger(sm, 3300.0)
    run = sm.runs["nightly"]
    assert [sm.jobs[j].submission_num for j in run.job_ids] == [3]
    assert run.replaced_job_ids == ["id-nightly-0-0-2"]
    assert sorted(sm.jobs) == ["id-nightly-0-0-2", "id-nightly-0-0-3"]


def test_a_snapshot_keeps_the_wait_and_unscheduled_runs_keep_their_shape() -> None:
    sm = world(host("n1", 8), scheduled(), submit("plain", task("H100:1")))
    doc = sm.snapshot()
    assert b'"next_triggered_at":300.0' in doc and doc.count(b"waiting_since") == 1
    copy = StateMachine()
    copy.restore(doc)
    run = copy.runs["nightly"]
    assert (run.status, run.waiting_since, run.next_triggered_at) == (RunStatus.PENDING, 2.0, T1)
    assert trigger(copy, 300.0).ok


def test_the_submission_entry_without_a_start_encodes_as_before() -> None:
    plain = submit("x", task("H100:1"))
    assert b"next_triggered_at" not in encode(plain)
    cmd = scheduled()
    assert decode(encode(cmd)).next_triggered_at == T1


def test_a_scheduled_service_starts_its_replicas_and_is_not_scaled_while_waiting() -> None:
    service = {
        "type": "service",
        "commands": ["serve"],
        "port": {"container_port": 8000},
        "replicas": {"min": 1, "max": 2},
        "scaling": {"metric": "rps", "target": 10},
        "resources": task("H100:1")["resources"],
        "schedule": CRON,
    }
    cmd = submit("svc", service).model_copy(update={"next_triggered_at": T1})
    sm = world(host("n1", 8), cmd)
    run = sm.runs["svc"]
    assert run.status is RunStatus.PENDING and run.job_ids == []
    scale = sm.apply_command(ScaleService(at=100.0, run_name="svc", group="0", replicas=2))
    assert not scale.ok and scale.code == "scheduled"
    assert not autoscaled(run)
    assert trigger(sm, 300.0, name="svc").ok
    assert autoscaled(run)
    assert run.desired_replicas == {"0": 1} and len(run.job_ids) == 1
    schedule(sm, now=301.0)
    assert run.status is RunStatus.RUNNING
