"""Auto-stop on the job's host: the trio task that applies ``autostop.py``'s rules to the jobs
running here, and publishes who is attached to them.

Decided where the facts are: the SSH sessions are this agent's (``Agent.sessions``, the one
``SessionTracker`` its SSH server updates) and so are the GPU samples (the telemetry gossip
takes every couple of seconds, handed over through ``record_telemetry``). A job that must end is
stopped through the executor (``Executor.autostop``): a graceful stop whose finish report
carries dstack's reason (``inactivity_duration_exceeded`` /
``terminated_due_to_utilization_policy``), fenced by epoch like every report.

The monitor wakes when the applied state changes (a new job, an in-place change of
``inactivity_duration``), when a session opens or closes, at the next inactivity deadline, and
at least every ``interval_s`` (utilization samples arrive continuously).

Activity is published through the replicated state (``JobActivity``) only when a job's session
count changes, batched over ``publish_delay_s`` (an IDE opens and closes many channels at once):
``ps -v`` computes the idle time from it, and a restarted agent, whose SSH sessions died with
it, knows when the job was last used.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import trio

from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.devenv.autostop import ENOUGH_DATA_SLACK_S, GPUSamples, decide, idle_since
from meshgpu.devenv.sessions import SessionTracker
from meshgpu.state import ActivityReport, JobActivity, JobStatus, StateMachine, encode

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0  # dstack checks running jobs every 10 s; this is cheaper, so oftener
PUBLISH_DELAY_S = 0.5


class Stopper(Protocol):
    """The executor's part the monitor uses."""

    local: dict[str, int]

    def autostop(self, job_id: str, reason: str, message: str = "") -> bool: ...


Propose = Callable[..., Awaitable[Any]]


class AutoStop:
    def __init__(
        self,
        node_id: str,
        state: StateMachine,
        executor: Stopper,
        sessions: SessionTracker,
        propose: Propose,
        *,
        clock: Clock = SYSTEM_CLOCK,
        interval_s: float = DEFAULT_INTERVAL_S,
        window_scale: float = 1.0,
        publish_delay_s: float = PUBLISH_DELAY_S,
    ) -> None:
        self.node_id, self.state, self.executor = node_id, state, executor
        self.sessions, self.propose, self.clock = sessions, propose, clock
        self.interval_s = interval_s
        self.window_scale = window_scale
        self.publish_delay_s = publish_delay_s
        self.samples = GPUSamples()
        self.started_at = clock.wall()
        self.stopped: dict[str, str] = {}  # job -> reason, once asked to stop (tests read it)
        self._wake = trio.Event()
        self._dirty: set[str] = set()
        self._tracked: set[str] = set()  # jobs the tracker holds something of
        self._publish = trio.Event()
        sessions.on_change(self._session_changed)

    # -- inputs ---------------------------------------------------------------------------
    def notify(self, _index: int = 0) -> None:
        """The applied state changed (``follow_applied``)."""
        self._wake.set()

    def record_telemetry(self, telemetry: Iterable[Any] | None) -> None:
        """One GPU sample of this host (``GPUTelemetry`` rows), as gossip took it."""
        if not telemetry:
            return
        utilization = {
            int(t.index): float(t.utilization_pct)
            for t in telemetry
            if getattr(t, "utilization_pct", None) is not None
        }
        self.samples.add(self.clock.wall(), utilization)

    def _session_changed(self, job_id: str) -> None:
        self._tracked.add(job_id)
        self._dirty.add(job_id)
        self._publish.set()
        self._wake.set()

    # -- the loops ------------------------------------------------------------------------
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publisher)
            while True:
                next_at = self.check()
                now = self.clock.wall()
                wait = self.interval_s if next_at is None else min(self.interval_s, next_at - now)
                with trio.move_on_after(max(wait, 0.01)):
                    await self._wake.wait()
                self._wake = trio.Event()

    def check(self) -> float | None:
        """Stop the local jobs that must end now; returns the next inactivity deadline."""
        now = self.clock.wall()
        next_at: float | None = None
        longest = 0.0
        for job_id, epoch in list(self.executor.local.items()):
            job = self.state.jobs.get(job_id)
            if job is None or job.epoch != epoch or job.node_id != self.node_id:
                continue
            if job.status is not JobStatus.RUNNING or job_id in self.stopped:
                continue
            run = self.state.runs.get(job.run_name)
            if run is None:
                continue
            spec = run.spec
            if spec.inactivity_duration_s is None and spec.utilization is None:
                continue
            started = job.started_at or now
            if spec.utilization is not None:
                longest = max(longest, spec.utilization.time_window_s * self.window_scale)
            idle_from = self.idle_since(job_id, started, job.sessions, job.inactive_since)
            verdict = decide(
                spec=spec,
                now=now,
                started_at=started,
                idle_from=idle_from,
                gpus=job.gpu_indices,
                samples=self.samples,
                window_scale=self.window_scale,
            )
            if verdict is not None:
                if self.executor.autostop(job_id, verdict.reason, verdict.message):
                    self.stopped[job_id] = verdict.reason
                    log.info(
                        "job=%s auto-stopped: %s (%s)", job_id, verdict.reason, verdict.message
                    )
                continue
            if spec.inactivity_duration_s is not None and idle_from is not None:
                deadline = idle_from + spec.inactivity_duration_s
                next_at = deadline if next_at is None else min(next_at, deadline)
        # Samples are kept as long as the longest window needs (an hour at least).
        self.samples.keep_s = max(3600.0, longest + 2 * ENOUGH_DATA_SLACK_S)
        for job_id in list(self.stopped):
            if job_id not in self.executor.local:
                del self.stopped[job_id]
        # The tracker forgets jobs that ended once their last session has gone.
        for job_id in list(self._tracked):
            job = self.state.jobs.get(job_id)
            ended = job is None or job.status.is_finished()
            if ended and job_id not in self._dirty and self.sessions.sessions(job_id) == 0:
                self.sessions.forget(job_id)
                self._tracked.discard(job_id)
        return next_at

    def idle_since(
        self, job_id: str, started_at: float, replicated_sessions: int, inactive: float | None
    ) -> float | None:
        return idle_since(
            started_at=started_at,
            tracked_sessions=self.sessions.sessions(job_id),
            tracked_last_closed=self.sessions.last_closed(job_id),
            tracked_ever=self.sessions.last_closed(job_id) is not None,
            replicated_inactive_since=inactive,
            replicated_sessions=replicated_sessions,
            monitor_started=self.started_at,
        )

    async def _publisher(self) -> None:
        """``JobActivity`` for the jobs whose session count changed, batched."""
        while True:
            await self._publish.wait()
            await self.clock.sleep(self.publish_delay_s)
            self._publish = trio.Event()
            dirty, self._dirty = self._dirty, set()
            reports = []
            for job_id in sorted(dirty):
                job = self.state.jobs.get(job_id)
                if job is None or job.status.is_finished():
                    if self.sessions.sessions(job_id) == 0:
                        self.sessions.forget(job_id)
                    continue
                if job.node_id != self.node_id:
                    continue
                n = self.sessions.sessions(job_id)
                last = self.sessions.last_closed(job_id)
                if job.sessions == n and job.inactive_since == (None if n else last):
                    continue
                reports.append(
                    ActivityReport(
                        job_id=job_id,
                        epoch=job.epoch,
                        sessions=n,
                        inactive_since=None if n else last,
                    )
                )
            if not reports:
                continue
            try:
                await self.propose(encode(JobActivity(at=self.clock.wall(), reports=reports)))
            except Exception as e:  # no leader now: the next change sends the news again
                log.warning("SSH activity not published (%s); retrying", e)
                self._dirty.update(r.job_id for r in reports)
                await self.clock.sleep(1.0)
                self._publish.set()
