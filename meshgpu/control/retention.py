"""Retention as a leader controller: forget finished runs beyond the policy (count and age), so
the state -- and every snapshot -- stays bounded. Every host then deletes the files of jobs the
state no longer knows (``meshgpu/host/housekeeping.py``)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from meshgpu.state import PruneRuns, encode

if TYPE_CHECKING:
    from meshgpu.replica.proposer import Proposer
    from meshgpu.state import StateMachine

log = logging.getLogger(__name__)


class Retention:
    def __init__(
        self,
        state: StateMachine,
        proposer: Proposer,
        keep_runs: int,
        keep_for_s: float,
        interval_s: float = 10.0,
    ) -> None:
        self.state, self.proposer = state, proposer
        self.keep_runs, self.keep_for_s = keep_runs, keep_for_s
        self.interval_s = interval_s  # how often the leader looks

    async def run(self) -> None:
        while True:
            await trio.sleep(self.interval_s)
            await self.step(time.time())

    async def step(self, now: float) -> None:
        finished = [r for r in self.state.runs.values() if r.status.is_finished()]
        old = any(now - (r.finished_at or now) > self.keep_for_s for r in finished)
        # A little past the limit before pruning: one entry per 10% of the count.
        keep = self.keep_runs
        if old or len(finished) > keep + max(keep // 10, 1):
            cmd = PruneRuns(at=now, keep=keep, max_age_s=self.keep_for_s)
            try:
                await self.proposer.propose(encode(cmd))
            except Exception as e:  # no quorum now: the next round tries again
                log.info("pruning deferred: %s", e)
