"""Self-fencing: a host cut off from the leader for long stops its jobs before the leader
(after the longer grace period) declares it dead and restarts them elsewhere, so a job never
runs in two places at once. Short leaderless spells (an election takes a second or two) leave
jobs running. The verdict (``cut_off``) is also gossiped (metadata "f"): the leader may fail
this host's jobs over at once.

It runs on the clock seam (``meshgpu/clock.py``): tests drive it under a mock clock, with the
production periods, in milliseconds (``tests/host/test_fencing.py``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from consensus.core import Role
from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.replica.leadership import election_window_s

if TYPE_CHECKING:
    from consensus.node import RaftNode

log = logging.getLogger(__name__)


class LocalJobs(Protocol):
    """What fencing needs of the executor: the jobs running here, and a way to stop them."""

    local: dict[str, int]

    def fence(self) -> None: ...


class Fencing:
    def __init__(
        self,
        node: RaftNode,
        executor: LocalJobs,
        fence_s: float,
        check_s: float = 0.5,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.node, self.executor = node, executor
        self.fence_s = fence_s  # silence from the leader after which local jobs are stopped
        self.check_s = check_s
        self.clock = clock
        self.cut_off = False  # no leader heard for ``fence_s`` (gossip tells the leader: "f")
        self._last_contact: float | None = None  # clock.now() when a leader was last heard

    async def run(self) -> None:
        self._last_contact = self.clock.now()
        while True:
            await self.clock.sleep(self.check_s)
            self.check(self.clock.now())

    def check(self, now: float) -> None:
        """Where this host stands at ``now`` (``clock.now()``); stops the local jobs when it
        has been cut off for ``fence_s``."""
        node = self.node
        if self._last_contact is None:
            self._last_contact = now
        if node.role is Role.LEADER and len(node.status()["voters"]) == 1:
            self._last_contact, self.cut_off = now, False
            return
        heard = node.last_heard.get(node.leader) if node.leader and node.leader != node.id else None
        if node.role is Role.LEADER or (
            heard is not None and now - heard < election_window_s(node.options)
        ):
            self._last_contact, self.cut_off = now, False
            return
        self.cut_off = now - self._last_contact > self.fence_s
        if self.cut_off and self.executor.local:
            log.warning(
                "no leader heard for %.0fs: stopping %d local job(s) (fencing)",
                now - self._last_contact,
                len(self.executor.local),
            )
            self.executor.fence()
