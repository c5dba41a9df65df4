"""The job and run lifecycles: the tables allow dstack's moves and nothing else, and the state
machine changes every status through them."""

from __future__ import annotations

import pytest

from meshgpu.state.lifecycle import (
    JOB_TRANSITIONS,
    RUN_TRANSITIONS,
    IllegalTransition,
    check_job_move,
    check_run_move,
)
from meshgpu.state.records import JobStatus, RunStatus

J, R = JobStatus, RunStatus
FINISHED_JOBS = [s for s in J if s.is_finished()]
FINISHED_RUNS = [s for s in R if s.is_finished()]


def test_the_job_path_of_a_run_that_goes_well() -> None:
    for old, new in [
        (J.SUBMITTED, J.PROVISIONING),
        (J.PROVISIONING, J.RUNNING),
        (J.RUNNING, J.TERMINATING),
        (J.TERMINATING, J.TERMINATING),  # a stop, then an abort
        (J.TERMINATING, J.TERMINATED),
        (J.RUNNING, J.DONE),
    ]:
        check_job_move("j", old, new)


@pytest.mark.parametrize("end", FINISHED_JOBS)
def test_a_finished_job_never_moves_again(end: JobStatus) -> None:
    assert not [t for t in JOB_TRANSITIONS if t[0] is end]
    for new in J:
        with pytest.raises(IllegalTransition, match="not a legal move"):
            check_job_move("j", end, new)


def test_a_job_is_done_only_once_placed_and_runs_only_once_placed() -> None:
    with pytest.raises(IllegalTransition):
        check_job_move("j", J.SUBMITTED, J.DONE)
    for old in (J.SUBMITTED, J.TERMINATING):
        with pytest.raises(IllegalTransition):
            check_job_move("j", old, J.RUNNING)
    with pytest.raises(IllegalTransition):
        check_job_move("j", J.RUNNING, J.PROVISIONING)


def test_every_live_job_can_end() -> None:
    for old in J:
        if not old.is_finished():
            assert any((old, end) in JOB_TRANSITIONS for end in FINISHED_JOBS)


def test_a_stopping_run_never_becomes_active_again() -> None:
    # (but ``pending``: a scheduled run whose cycle ended waits for its next start, dstack)
    check_run_move("r", R.TERMINATING, R.PENDING)
    for new in (R.SUBMITTED, R.PROVISIONING, R.RUNNING):
        with pytest.raises(IllegalTransition):
            check_run_move("r", R.TERMINATING, new)
    for end in FINISHED_RUNS:
        check_run_move("r", R.TERMINATING, end)
        assert not [t for t in RUN_TRANSITIONS if t[0] is end]


def test_the_state_machine_refuses_an_illegal_move() -> None:
    from tests.scheduler._world import host, schedule, submit, task, world

    sm = world(host("n1", 8), submit("a", task("H100:1"), at=1))
    schedule(sm)
    [job] = sm.run_jobs(sm.runs["a"])
    assert job.status is J.RUNNING  # the world's hosts start what they are given
    sm._move(job, J.DONE)  # noqa: SLF001
    with pytest.raises(IllegalTransition, match="done -> running"):
        sm._move(job, J.RUNNING)  # noqa: SLF001
