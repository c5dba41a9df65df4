"""Retention as a leader controller: forget finished runs beyond the policy (count and age), so
the state -- and every snapshot -- stays bounded. Every host then deletes the files of jobs the
state no longer knows (``meshgpu/host/housekeeping.py``).

When to prune is the pure rule ``meshgpu.state.retention.prune_due``; this controller only
looks every ``interval_s`` on the clock seam (``meshgpu/clock.py``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.state import PruneRuns, encode
from meshgpu.state.retention import prune_due

if TYPE_CHECKING:
    from meshgpu.replica.proposer import Proposer
    from meshgpu.state import StateMachine

log = logging.getLogger(__name__)

INTERVAL_S = 10.0  # how often the leader applies the retention policy


class Retention:
    def __init__(
        self,
        state: StateMachine,
        proposer: Proposer,
        keep_runs: int,
        keep_for_s: float,
        interval_s: float = INTERVAL_S,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.state, self.proposer = state, proposer
        self.keep_runs, self.keep_for_s = keep_runs, keep_for_s
        self.interval_s = interval_s  # how often the leader looks
        self.clock = clock

    async def run(self) -> None:
        while True:
            await self.clock.sleep(self.interval_s)
            await self.step(self.clock.wall())

    async def step(self, now: float) -> None:
        """Prune if the policy says so at ``now`` (wall seconds)."""
        if prune_due(self.state.runs.values(), now, self.keep_runs, self.keep_for_s):
            cmd = PruneRuns(at=now, keep=self.keep_runs, max_age_s=self.keep_for_s)
            try:
                await self.proposer.propose(encode(cmd))
            except Exception as e:  # no quorum now: the next round tries again
                log.info("pruning deferred: %s", e)
