"""When will a job have let go of its host, at the latest?

Jobs carry no runtime estimates. The only bound a user gives is ``max_duration`` (enforced by the
runner, then the graceful stop), so a job's *deadline* is:

* running: ``started_at + max_duration + stop + margin``;
* assigned, not started yet: ``assigned_at + start allowance + max_duration + stop + margin``;
* stopping (terminating): ``now + stop + margin``;
* without ``max_duration``: never (infinity) -- and with no ``now`` given, every deadline is.

``stop`` is the run's ``stop_duration`` (300 s by default, 3600 s when ``off``, as the runner does:
``RunSpec.stop_grace_s``).
Backfill (``placement.py``) trusts only these bounds, so it can be wrong only when a host takes
longer to start a job than the start allowance.
"""

from __future__ import annotations

import math

from meshgpu.config.spec import RunSpec
from meshgpu.scheduler.policy import SchedulerPolicy
from meshgpu.state.records import JobRecord, JobStatus

INF = math.inf


class Deadlines:
    """Deadline arithmetic for one plan (``now`` fixed)."""

    def __init__(self, now: float | None, policy: SchedulerPolicy) -> None:
        self.now = now
        self.policy = policy

    def of_new(self, spec: RunSpec) -> float:
        """The deadline of a job of this run if it were assigned now."""
        limit = spec.max_duration_s
        if self.now is None or limit is None:
            return INF
        p = self.policy
        return self.now + p.start_allowance_s + limit + spec.stop_grace_s + p.finish_allowance_s

    def of_stopping(self, spec: RunSpec) -> float:
        """The deadline of a job of this run told to stop now."""
        if self.now is None:
            return INF
        return self.now + spec.stop_grace_s + self.policy.finish_allowance_s

    def of_held(self, job: JobRecord, spec: RunSpec) -> float:
        """The deadline of a job that holds resources now."""
        if self.now is None:
            return INF
        p = self.policy
        stop = spec.stop_grace_s + p.finish_allowance_s
        if job.status is JobStatus.TERMINATING:
            return self.now + stop
        limit = spec.max_duration_s
        if limit is None:
            return INF
        if job.status is JobStatus.RUNNING and job.started_at is not None:
            return job.started_at + limit + stop
        since = job.assigned_at if job.assigned_at is not None else self.now
        return since + p.start_allowance_s + limit + stop
