"""The membership manager (on the leader): who votes and who only follows.

Autopilot-style rules (reference raft-and-gossip.md §B.6):

* every new host joins as a **learner** (admission adds it);
* the voter set is kept at ``target`` (3, or 5 once 5 healthy members exist; configurable),
  preferring hosts in ``zone`` labels no voter has yet;
* a learner is promoted only after it has been caught up (its match index within a few entries
  of the commit index) and heard from continuously for ``stabilization_s``; before the
  promotion the leader seals the CA key to it (a voter can admit hosts);
* a voter not heard from for ``3 * dead_grace_s`` is removed -- but never if that would leave fewer
  live voters than a quorum of the new configuration -- and replaced by promoting a learner;
* a learner dead for ``3 * dead_grace_s`` is removed from the configuration (it rejoins as
  itself, with a new Raft id, when it comes back).

One change at a time: the Raft core refuses a second while one is uncommitted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from consensus.core import ProposalDropped, Role
from consensus.node import NotLeader, RaftNode, Timeout
from meshgpu.security import NodeIdentity, seal
from meshgpu.state.cluster import (
    ClusterState,
    GrantCAKey,
    NodeUnreachable,
    RemoveMember,
    SetNodeStatus,
    encode_cluster,
)
from meshgpu.state.machine import StateMachine

log = logging.getLogger(__name__)


@dataclass
class MembershipPolicy:
    target_voters: int = 3
    max_voters: int = 5
    stabilization_s: float = 2.0
    dead_grace_s: float = 30.0
    """Silence after which the leader declares a host dead (its jobs fail over) and a dead voter
    is replaced. A host cut off for ``fence_fraction`` of it stops its own jobs first, so a job
    never runs in two places at once."""
    fence_fraction: float = 0.6
    interval_s: float = 0.5


class MembershipManager:
    def __init__(
        self,
        node: RaftNode,
        cluster: ClusterState,
        identity: NodeIdentity,
        zones: Callable[[], dict[int, str]],
        propose: Callable[[bytes], Awaitable[Any]],
        policy: MembershipPolicy | None = None,
        jobs: StateMachine | None = None,
    ) -> None:
        self.jobs = jobs
        self.node, self.cluster, self.identity = node, cluster, identity
        self.zones = zones
        self.propose = propose
        self.policy = policy or MembershipPolicy()
        self._caught_up_since: dict[int, float] = {}

    async def run(self) -> None:
        while True:
            await trio.sleep(self.policy.interval_s)
            if self.node.role is not Role.LEADER:
                self._caught_up_since.clear()
                continue
            try:
                await self.step(trio.current_time())
            except (NotLeader, Timeout, ProposalDropped) as e:
                log.info("membership change deferred: %s", e)

    def _alive(self, rid: int, now: float, within: float) -> bool:
        if rid == self.node.id:
            return True
        heard = self.node.last_heard.get(rid)
        return heard is not None and now - heard <= within

    async def step(self, now: float) -> None:
        st = self.node.status()
        voters, learners = set(st["voters"]), set(st["learners"])
        progress = st["progress"]
        p = self.policy
        # Hosts not heard from for the grace period: dead to the scheduler, their jobs fail over.
        if self.jobs is not None:
            for m in self.cluster.members.values():
                node = self.jobs.nodes.get(m.node_id)
                if m.removed or m.raft_id == self.node.id or node is None:
                    continue
                if node.status not in ("active", "unreachable"):
                    continue
                # Silent for two election timeouts: no new work goes there (its jobs keep
                # running); heard from again: back in service.
                election = self._election_s()
                if now - self.node.leader_since < election:
                    break  # a new leader: give every host one election timeout to be heard
                wanted = "active" if self._alive(m.raft_id, now, election) else "unreachable"
                if node.status != wanted:
                    await self.propose(
                        encode_cluster(
                            SetNodeStatus(at=time.time(), node_id=m.node_id, status=wanted)
                        )
                    )
                    return
                if (
                    not self._alive(m.raft_id, now, p.dead_grace_s)
                    and now - self._started(m.raft_id, now) > p.dead_grace_s
                ):
                    log.warning(
                        "host %s unreachable for %.0fs: marking it dead", m.name, p.dead_grace_s
                    )
                    await self.propose(
                        encode_cluster(NodeUnreachable(at=time.time(), node_id=m.node_id))
                    )
                    return
        # Dead voters out, if a quorum of the new set stays alive.
        # (Longer than the job fail-over grace: a host that was only cut off should find itself
        # still a member when it comes back.)
        for v in sorted(voters - {self.node.id}):
            if (
                not self._alive(v, now, 3 * p.dead_grace_s)
                and now - self._started(v, now) > 3 * p.dead_grace_s
            ):
                rest = voters - {v}
                live = sum(1 for x in rest if self._alive(x, now, p.dead_grace_s))
                if live >= len(rest) // 2 + 1:
                    log.info("removing dead voter %s", v)
                    await self.node.remove(v)
                    await self.propose(encode_cluster(RemoveMember(at=time.time(), raft_id=v)))
                    return
        for learner in sorted(learners):
            if (
                not self._alive(learner, now, 3 * p.dead_grace_s)
                and now - self._started(learner, now) > 3 * p.dead_grace_s
            ):
                log.info("removing dead learner %s", learner)
                await self.node.remove(learner)
                await self.propose(encode_cluster(RemoveMember(at=time.time(), raft_id=learner)))
                return
        # Promote caught-up, stable learners up to the target.
        healthy = [m for m in (voters | learners) if self._alive(m, now, 2.0 * self._election_s())]
        target = p.max_voters if len(healthy) >= p.max_voters else p.target_voters
        candidates = []
        for learner in learners:
            pr = progress.get(learner)
            caught_up = (
                pr is not None
                and pr["match"] >= st["commit"] - 5
                and self._alive(learner, now, self._election_s())
            )
            if not caught_up:
                self._caught_up_since.pop(learner, None)
                continue
            since = self._caught_up_since.setdefault(learner, now)
            if now - since >= p.stabilization_s:
                candidates.append(learner)
        if len(voters) >= target or not candidates:
            return
        zones = self.zones()
        used = {zones.get(v) for v in voters}
        candidates.sort(key=lambda r: (zones.get(r) in used, r))  # new zones first
        chosen = candidates[0]
        await self._grant_ca_key(chosen)
        log.info("promoting learner %s to voter", chosen)
        await self.node.promote(chosen)

    def _election_s(self) -> float:
        o = self.node.options
        return o.tick_s * o.election_tick * 2

    def _started(self, rid: int, now: float) -> float:
        """When we started watching ``rid`` (a fresh leader gives every peer a full grace)."""
        return self.node.watch_since.setdefault(rid, now)

    async def _grant_ca_key(self, rid: int) -> None:
        member = self.cluster.members.get(rid)
        if member is None or not member.csr_pem or rid in self.cluster.ca_grants:
            return
        key_pem = self.identity.ca_key_path.read_bytes()
        sealed = seal(key_pem, member.csr_pem.encode())
        await self.propose(
            encode_cluster(GrantCAKey(at=time.time(), raft_id=rid, sealed_hex=sealed.hex()))
        )
