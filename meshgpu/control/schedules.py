"""Scheduled runs (``schedule: {cron: ...}``, dstack) as a leader controller: every
``interval_s`` it looks at the runs waiting for their next start (``RunRecord.awaiting_trigger``)
and

* arms one that has no start yet (its cycle just ended): ``ScheduleRun`` with the first cron
  time after the run's ``waiting_since`` -- a time in the state, so every leader computes the
  same start, and one that was down across it still starts the run (once, late);
* starts one whose time has come: ``TriggerRun`` carrying the start it fires.

The controller keeps nothing of its own: a new leader reads the state and goes on, and both
commands are checked at apply against the run's current wait, so a start proposed twice (by
two leaders across a failover, or a retried proposal) happens once, and none is skipped."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.config.cron import CronError, next_start
from meshgpu.state import ScheduleRun, TriggerRun, encode

if TYPE_CHECKING:
    from meshgpu.replica.proposer import Proposer
    from meshgpu.state import Command, StateMachine

log = logging.getLogger(__name__)

INTERVAL_S = 1.0  # how often the leader looks (cron has minute granularity)


class Schedules:
    def __init__(
        self,
        state: StateMachine,
        proposer: Proposer,
        interval_s: float = INTERVAL_S,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.state, self.proposer = state, proposer
        self.interval_s = interval_s
        self.clock = clock

    async def run(self) -> None:
        while True:
            await self.step(self.clock.wall())
            await self.clock.sleep(self.interval_s)

    def due(self, now: float) -> list[Command]:
        """What to propose at ``now`` (wall seconds): pure, for tests and for ``step``."""
        out: list[Command] = []
        for run in list(self.state.runs.values()):
            if not run.awaiting_trigger or not run.spec.schedule:
                continue
            assert run.waiting_since is not None
            if run.next_triggered_at is None:
                try:
                    at = next_start(run.spec.schedule, run.waiting_since)
                except CronError as e:  # checked at submit; an older build's entry, say
                    log.warning("run=%s cannot be scheduled: %s", run.run_name, e)
                    continue
                out.append(
                    ScheduleRun(
                        at=now,
                        run_name=run.run_name,
                        waiting_since=run.waiting_since,
                        next_triggered_at=at,
                    )
                )
            elif now >= run.next_triggered_at:
                out.append(
                    TriggerRun(at=now, run_name=run.run_name, triggered_at=run.next_triggered_at)
                )
        return out

    async def step(self, now: float) -> None:
        for cmd in self.due(now):
            try:
                result = await self.proposer.propose(encode(cmd))
            except Exception as e:  # no quorum now: the next round decides again
                log.info("run=%s %s deferred: %s", cmd.run_name, cmd.kind, e)  # type: ignore[attr-defined]
                continue
            if isinstance(cmd, TriggerRun) and getattr(result, "ok", False):
                log.info("run=%s started on schedule (%s)", cmd.run_name, cmd.triggered_at)
