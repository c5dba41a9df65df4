"""The scheduler's trigger: every transition that frees capacity or changes what waits bumps
``demand_version`` (the agent plans only when it changed), so a queued job never waits for an
unrelated submission to be placed."""

from __future__ import annotations

import pytest

from meshgpu.scheduler import plan
from meshgpu.state import (
    AssignJobs,
    Assignment,
    JobFinished,
    JobReports,
    JobStarted,
    JobStatus,
    JobTerminationReason,
    RegisterNode,
    RunStatus,
    StateMachine,
    StopRun,
)
from meshgpu.testing import host
from tests.state.test_state import apply, submit, task

# In a container: two replicas share a host (a process job's port would keep them apart).
SERVICE = (
    "type: service\nport: 8000\nreplicas: 2\nimage: app\ncommands: [serve]\nresources:\n  gpu: 1\n"
)


def node(node_id: str, gpus: int) -> RegisterNode:
    return host(node_id, gpus, runtime="docker")  # runs the service's container


class Scheduler:
    """The agent's loop (``meshgpu/control/scheduling.py``): plan only when ``demand_version`` moved;
    a plan is proposed, and other commands may commit before it does."""

    def __init__(self, sm: StateMachine) -> None:
        self.sm = sm
        self.seen = -1

    def decide(self) -> AssignJobs | None:
        if self.sm.demand_version == self.seen:
            return None
        self.seen = self.sm.demand_version
        p = plan(self.sm, 3.0)
        return AssignJobs(at=3.0, assignments=p.assignments, pending_reasons=p.pending)

    def step(self) -> None:
        cmd = self.decide()
        if cmd is not None:
            apply(self.sm, cmd)


def start_placed(sm: StateMachine) -> None:
    for j in list(sm.jobs.values()):
        if j.status is JobStatus.PROVISIONING:
            apply(sm, JobStarted(at=4.0, job_id=j.job_id, epoch=j.epoch, started_at=4.0))


def ended(sm: StateMachine, run: str) -> JobReports:
    """What the executor reports once a stopped run's processes are gone (one batch)."""
    return JobReports(
        at=7.0,
        reports=[
            JobFinished(
                at=7.0,
                job_id=j.job_id,
                epoch=j.epoch,
                reason=JobTerminationReason.TERMINATED_BY_USER,
                exit_code=143,
            )
            for j in sm.run_jobs(sm.runs[run])
            if j.status is JobStatus.TERMINATING
        ],
    )


@pytest.mark.parametrize(
    ("hosts", "gang"),
    [
        ({"n1": 2}, SERVICE),  # two replicas on one host
        ({"n1": 1, "n2": 1}, task("1", nodes=2)),  # a two-node gang
    ],
    ids=["replicas", "multi-node"],
)
def test_a_task_behind_two_stopped_runs_starts_without_another_submission(
    hosts: dict[str, int], gang: str
) -> None:
    sm = StateMachine()
    apply(sm, *(node(n, g) for n, g in hosts.items()))
    sched = Scheduler(sm)
    apply(sm, submit("g1", gang), submit("g2", gang, at=2.1), submit("t", task("1"), at=2.2))
    sched.step()
    start_placed(sm)
    assert sm.runs["g1"].status is RunStatus.RUNNING
    assert sm.runs["g2"].status is sm.runs["t"].status is RunStatus.SUBMITTED
    sched.step()  # nothing else fits
    # The user stops both runs. g1's processes exit, and the leader plans on what it sees:
    # g2 still waits, so the freed GPUs go to g2 -- but the stop of g2 commits before that
    # decision does, and the decision is refused.
    apply(sm, StopRun(at=6.0, run_name="g1"))
    sched.step()
    apply(sm, ended(sm, "g1"))
    stale = sched.decide()
    assert stale is not None and stale.assignments
    assert {sm.jobs[a.job_id].run_name for a in stale.assignments} == {"g2"}
    apply(sm, StopRun(at=6.5, run_name="g2"))
    res = apply(sm, stale)[0]
    assert res.value["refused"] and not res.value["accepted"]  # type: ignore[attr-defined]
    assert sm.runs["g1"].status is sm.runs["g2"].status is RunStatus.TERMINATED
    # No other submission: the scheduler must have been woken by what happened.
    sched.step()
    (t,) = sm.run_jobs(sm.runs["t"])
    assert t.status is JobStatus.PROVISIONING


def test_each_transition_that_frees_capacity_or_changes_what_waits_bumps_demand() -> None:
    sm = StateMachine()
    apply(sm, node("n1", 2))
    sched = Scheduler(sm)
    apply(sm, submit("a", task("2")), submit("b", task("2"), at=2.1))
    sched.step()
    start_placed(sm)

    def bumps(*cmds: object) -> bool:
        before = sm.demand_version
        apply(sm, *cmds)
        return sm.demand_version != before

    # A waiting run stopped: whatever queued behind it may go first now.
    assert bumps(StopRun(at=5.0, run_name="b"))
    # A running one stopped: capacity comes back soon (and preemption must not count on it).
    assert bumps(StopRun(at=5.1, run_name="a"))
    # Its job reports its end: the GPUs are free.
    assert bumps(ended(sm, "a"))
    # A decision refused at apply (stale) is planned again.
    apply(sm, submit("c", task("2"), at=6.0))
    stale = sched.decide()
    assert stale is not None and stale.assignments
    apply(sm, submit("hog", task("1"), at=6.1))
    hog = sm.run_jobs(sm.runs["hog"])[0]
    apply(
        sm,
        AssignJobs(
            at=6.2, assignments=[Assignment(job_id=hog.job_id, node_id="n1", gpu_indices=[0])]
        ),
    )
    assert hog.status is JobStatus.PROVISIONING
    assert bumps(stale)
    # Restoring a snapshot keeps the version the leader had (rebuilding indexes is no event).
    copy = StateMachine()
    copy.restore(sm.snapshot())
    assert copy.demand_version == sm.demand_version


def test_a_task_held_back_by_a_waiting_run_starts_once_that_run_is_stopped() -> None:
    sm = StateMachine()
    apply(sm, node("n1", 4))
    sched = Scheduler(sm)
    apply(sm, submit("g1", SERVICE))
    sched.step()
    start_placed(sm)
    # g2's first replica needs 3 GPUs and holds the host for itself; the task waits behind it
    # although two GPUs are free.
    apply(sm, submit("g2", SERVICE.replace("gpu: 1", "gpu: 3")), submit("t", task("1"), at=2.2))
    sched.step()
    (t,) = sm.run_jobs(sm.runs["t"])
    assert t.status is JobStatus.SUBMITTED and "ahead in the queue" in t.why_pending
    sched.step()
    # Both stopped; g1's replicas are still stopping (they hold GPUs 0-1 until they exit).
    apply(sm, StopRun(at=6.0, run_name="g1"), StopRun(at=6.1, run_name="g2"))
    sched.step()
    assert t.status is JobStatus.PROVISIONING and set(t.gpu_indices) <= {2, 3}
