"""Job and run lifecycles as transition tables (h11's shape): the moves a status may make.

Every status change in ``StateMachine`` goes through ``job_moves``/``run_moves``, which refuse a
move the table does not list by raising ``IllegalTransition``: a programming error (a handler
that would, say, bring a finished job back to life), never a refused command -- commands are
checked before they change anything. Finished statuses are terminal.

The job table follows dstack's job status machine (reference/dstack-semantics.md §4) as meshgpu
drives it: a waiting job is placed (``provisioning``) or ends without running; a placed job
starts, is asked to stop (``terminating``; asked again to make a stop an abort), or ends; it is
done only if it was placed. A run's status is derived from its jobs (``_update_run``), so it may
move between the active statuses as they change, except that a run being stopped never becomes
active again -- but for a scheduled run whose cycle ended by itself (done or failed, not stopped
by the user), which goes back to ``pending`` until its next start (dstack).
"""

from __future__ import annotations

from meshgpu.state.records import JobStatus, RunStatus

_J = JobStatus
_JOB_FINISHED = frozenset({_J.TERMINATED, _J.ABORTED, _J.FAILED, _J.DONE})
_PLACED = (_J.PROVISIONING, _J.PULLING, _J.RUNNING)

JOB_TRANSITIONS: frozenset[tuple[JobStatus, JobStatus]] = frozenset(
    {(_J.SUBMITTED, _J.PROVISIONING)}
    | {(_J.SUBMITTED, end) for end in _JOB_FINISHED - {_J.DONE}}
    | {(_J.PROVISIONING, _J.PULLING), (_J.PROVISIONING, _J.RUNNING), (_J.PULLING, _J.RUNNING)}
    | {(s, _J.TERMINATING) for s in (*_PLACED, _J.TERMINATING)}
    | {(s, end) for s in (*_PLACED, _J.TERMINATING) for end in _JOB_FINISHED}
)

_R = RunStatus
_RUN_ACTIVE = (_R.PENDING, _R.SUBMITTED, _R.PROVISIONING, _R.RUNNING)
_RUN_FINISHED = (_R.TERMINATED, _R.FAILED, _R.DONE)

RUN_TRANSITIONS: frozenset[tuple[RunStatus, RunStatus]] = frozenset(
    {(s, t) for s in _RUN_ACTIVE for t in (*_RUN_ACTIVE, _R.TERMINATING, *_RUN_FINISHED)}
    | {(_R.TERMINATING, t) for t in (_R.TERMINATING, *_RUN_FINISHED)}
    | {(_R.TERMINATING, _R.PENDING)}  # a scheduled run's cycle ended: waits for its next start
)


class IllegalTransition(RuntimeError):
    """A status change its lifecycle table does not allow (a bug in the state machine)."""


def check_job_move(job_id: str, old: JobStatus, new: JobStatus) -> None:
    if (old, new) not in JOB_TRANSITIONS:
        raise IllegalTransition(f"job {job_id}: {old.value} -> {new.value} is not a legal move")


def check_run_move(run_name: str, old: RunStatus, new: RunStatus) -> None:
    if (old, new) not in RUN_TRANSITIONS:
        raise IllegalTransition(f"run {run_name}: {old.value} -> {new.value} is not a legal move")
