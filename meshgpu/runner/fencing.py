"""Self-fencing: a host cut off from the leader for long stops its own jobs.

The leader declares a silent host dead after ``dead_grace_s`` and runs its jobs elsewhere; the
host itself, once it has heard no leader for ``fence_fraction`` of that, stops them first, so a
job never runs in two places at once. Short leaderless spells (an election takes a second or
two) leave jobs running. The verdict (``cut_off``) is also gossiped (metadata "f"): the leader
may fail this host's jobs over at once.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from consensus.core import Role
from meshgpu.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)


class _Jobs(Protocol):
    local: dict[str, int]

    def fence(self) -> None: ...


class Fence:
    def __init__(
        self,
        node: Any,
        jobs: _Jobs,
        fence_s: float,
        clock: Clock = SYSTEM_CLOCK,
        interval_s: float = 0.5,
    ) -> None:
        self.node, self.jobs, self.fence_s = node, jobs, fence_s
        self.clock, self.interval_s = clock, interval_s
        self.cut_off = False
        self._last_contact: float | None = None

    async def run(self) -> None:
        self._last_contact = self.clock.now()
        while True:
            await self.clock.sleep(self.interval_s)
            self.check(self.clock.now())

    def check(self, now: float) -> None:
        """Where this host stands at ``now`` (trio time); stops the local jobs when cut off."""
        node = self.node
        if self._last_contact is None:
            self._last_contact = now
        if node.role is Role.LEADER and len(node.status()["voters"]) == 1:
            self._last_contact, self.cut_off = now, False
            return
        heard = node.last_heard.get(node.leader) if node.leader and node.leader != node.id else None
        if node.role is Role.LEADER or (
            heard is not None and now - heard < 2 * node.options.tick_s * node.options.election_tick
        ):
            self._last_contact, self.cut_off = now, False
            return
        self.cut_off = now - self._last_contact > self.fence_s
        if self.cut_off and self.jobs.local:
            log.warning(
                "no leader heard for %.0fs: stopping %d local job(s) (fencing)",
                now - self._last_contact,
                len(self.jobs.local),
            )
            self.jobs.fence()
