"""Self-fencing: a host cut off from the leader for long stops its jobs before the leader
(after the longer grace period) declares it dead and restarts them elsewhere, so a job never
runs in two places at once. Short leaderless spells (an election takes a second or two) leave
jobs running."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from consensus.core import Role
from meshgpu.replica.leadership import election_window_s

if TYPE_CHECKING:
    from consensus.node import RaftNode
    from meshgpu.runner.executor import Executor

log = logging.getLogger(__name__)


class Fencing:
    def __init__(
        self, node: RaftNode, executor: Executor, fence_s: float, check_s: float = 0.5
    ) -> None:
        self.node, self.executor = node, executor
        self.fence_s = fence_s  # silence from the leader after which local jobs are stopped
        self.check_s = check_s
        self.cut_off = False  # no leader heard for ``fence_s`` (gossip tells the leader: "f")

    async def run(self) -> None:
        last_contact = trio.current_time()
        node = self.node
        window = election_window_s(node.options)
        while True:
            await trio.sleep(self.check_s)
            now = trio.current_time()
            if node.role is Role.LEADER and len(node.status()["voters"]) == 1:
                last_contact = now
                self.cut_off = False
                continue
            heard = (
                node.last_heard.get(node.leader) if node.leader and node.leader != node.id else None
            )
            if node.role is Role.LEADER or (heard is not None and now - heard < window):
                last_contact = now
                self.cut_off = False
                continue
            # Gossip tells the leader (metadata "f"): it may fail this host's jobs over at once.
            self.cut_off = now - last_contact > self.fence_s
            if self.cut_off and self.executor.local:
                log.warning(
                    "no leader heard for %.0fs: stopping %d local job(s) (fencing)",
                    now - last_contact,
                    len(self.executor.local),
                )
                self.executor.fence()
