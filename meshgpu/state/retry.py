"""Retry: whether a failed replica is resubmitted, and when its new submission may start.

dstack's ``retry`` (reference §1.2, §4.4): ``retry: true`` covers every event for 1 h; an object
``{on_events: [...], duration: ...}`` covers the listed events (all when omitted) for ``duration``
(1 h when omitted). Events come from the job's termination reason
(``JobTerminationReason.to_retry_event``): ``error`` -- the job failed by itself; ``interruption``
-- its host went away or it was preempted; ``no-capacity`` never happens here, because meshgpu has
a queue and a job that does not fit waits instead of failing.

The *window*: dstack counts ``duration`` from the last time the failed replica was alive, which,
with a queue that takes a resubmission at once, never runs out -- a job that always exits 1 would
loop forever. Here a *streak* of failures begins with the first failure after the replica had been
running for at least ``duration`` (or ever); retrying stops once ``duration`` has passed since the
streak began. A long training run that loses a host after two days is resubmitted; a job that
crashes on start is retried for ``duration``, then the run fails with ``retry_limit_exceeded``.

The *backoff*: the first resubmission of a streak may start at once, the next ones wait 15 s,
30 s, 1 m, 2 m, 5 m, then 10 m each (dstack's delays), so a crash loop costs little.

A *preemption* is an interruption (the policy must cover it) but not a failure of the replica:
it is resubmitted at once, without backoff, and leaves the streak as it was.

Pure functions of records and times carried by commands: no clock is read here.
"""

from __future__ import annotations

from meshgpu.config.spec import RetryPolicy
from meshgpu.state.records import JobRecord, ReplicaRetry, RunTerminationReason

BACKOFF_S = (0.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def backoff(attempt: int) -> float:
    """Seconds a resubmission waits before it may start: attempt 1 of a streak at once."""
    return BACKOFF_S[max(0, min(attempt, len(BACKOFF_S)) - 1)]


def decide(
    policy: RetryPolicy | None,
    failed: JobRecord,
    event: str | None,
    at: float,
    message: str = "",
    *,
    preempted: bool = False,
) -> ReplicaRetry | RunTerminationReason:
    """The replica of ``failed`` ended with ``event`` at ``at``: resubmit it (the returned
    ``ReplicaRetry``), or fail the run (``job_failed`` when the policy does not cover the event,
    ``retry_limit_exceeded`` when the streak has outlasted ``duration``).

    A preemption is an interruption the policy must cover, but no failure of the replica's: it
    goes back to the queue at once, and neither starts, extends nor ends a streak."""
    if policy is None or event is None or event not in policy.events or policy.duration <= 0:
        return RunTerminationReason.JOB_FAILED
    if preempted:
        return ReplicaRetry(
            replica_num=failed.replica_num,
            event=event,
            since=failed.retry_since,
            attempt=failed.retry_attempt,
            at=at,
            not_before=at,
            message=message,
        )
    ran = at - failed.started_at if failed.started_at is not None else 0.0
    if failed.retry_since is None or ran >= policy.duration:
        since, attempt = at, 1  # a new streak: the replica had recovered (or never failed)
    else:
        since, attempt = failed.retry_since, failed.retry_attempt + 1
    if at - since > policy.duration:
        return RunTerminationReason.RETRY_LIMIT_EXCEEDED
    return ReplicaRetry(
        replica_num=failed.replica_num,
        event=event,
        since=since,
        attempt=attempt,
        at=at,
        not_before=at + backoff(attempt),
        message=message,
    )
