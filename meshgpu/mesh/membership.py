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

Host liveness combines two signals (:func:`host_status`, docs/operations.md "Gossip"): Raft
traffic between the leader and the host (one link, fast) and the gossip view (SWIM: many
members probe the host, directly and indirectly, and it can refute a false suspicion). The
leader also turns the GPU health hosts report through gossip into ``SetGPUHealth`` commands.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from consensus.core import ProposalDropped
from consensus.node import NotLeader, RaftNode, Timeout
from consensus.storage import StorageFull
from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.mesh.gossip import MemberInfo, MemberState
from meshgpu.mesh.node_meta import parse_meta
from meshgpu.replica.leadership import election_window_s
from meshgpu.security import NodeIdentity, seal
from meshgpu.state.cluster import (
    ClusterState,
    GrantCAKey,
    NodeUnreachable,
    RemoveMember,
    SetNodeStatus,
    encode_cluster,
)
from meshgpu.state.commands import GPUHealth, SetGPUHealth, encode
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


class GossipView(Protocol):
    """What the leader reads from its own gossip member (``MeshGossip``)."""

    @property
    def running_since(self) -> float | None: ...

    def member(self, node_id: str) -> MemberInfo | None: ...


_GONE = (MemberState.DEAD, MemberState.LEFT)
HostStatus = Literal["active", "unreachable", "dead", "keep"]


def host_status(
    raft_silent_s: float | None,
    gossip: MemberInfo | None,
    now: float,
    *,
    election_s: float,
    grace_s: float,
    watched_s: float = math.inf,
) -> HostStatus:
    """Where a host stands, from the two liveness signals.

    ``raft_silent_s``: how long the leader has not heard the host over Raft (``inf``: never;
    ``None``: the host is not in the Raft configuration, so Raft says nothing about it);
    ``watched_s``: how long this leader has been watching it (a new leader gives every host a
    full grace period before declaring it dead). ``gossip``: the leader's
    gossip view of the host (``None``: gossip cannot vouch either way -- not running, or the
    host unknown to it, e.g. an agent without gossip). ``now`` is on the gossip view's clock.

    * ``active``: heard over Raft (or, without Raft, alive in gossip) and not dead in gossip.
    * ``unreachable`` (no new work; jobs keep running): silent over Raft for two election
      timeouts, or dead/left in gossip -- either way the host is not safe to place on.
    * ``dead`` (its jobs fail over): silent over Raft for the grace period *and* gossip agrees:
      dead or left there, unable to vouch, or alive but the host itself says it has been cut
      off from the leader long enough to have fenced its jobs. A host gossip still hears and
      that has not fenced stays unreachable however long the leader cannot hear it: its jobs
      are running (an asymmetric partition), and failing them over would run them twice.
      Without a Raft signal, dead in gossip for the grace period is enough.
    * ``keep``: no signal at all; leave the record as it is.
    """
    gone = gossip is not None and gossip.state in _GONE
    if raft_silent_s is None:
        if gossip is None:
            return "keep"
        if not gone:
            return "active"
        return "dead" if now - gossip.state_since >= grace_s else "unreachable"
    silent_for_grace = min(raft_silent_s, watched_s) >= grace_s
    if silent_for_grace and (gossip is None or gone or parse_meta(gossip.meta).cut_off):
        return "dead"
    if raft_silent_s > election_s or gone:
        return "unreachable"
    return "active"


class MembershipManager:
    def __init__(
        self,
        node: RaftNode,
        cluster: ClusterState,
        identity: NodeIdentity,
        zones: Callable[[], dict[int, str]] | None,
        propose: Callable[[bytes], Awaitable[Any]],
        policy: MembershipPolicy | None = None,
        jobs: StateMachine | None = None,
        gossip: GossipView | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.clock = clock
        self.jobs = jobs
        self.gossip = gossip
        self.node, self.cluster, self.identity = node, cluster, identity
        self.zones = zones or self._zones  # Raft id -> zone label (None: from the records)
        self.propose = propose
        self.policy = policy or MembershipPolicy()
        self._caught_up_since: dict[int, float] = {}

    async def run(self) -> None:
        """The leader's membership controller (started by ``Leadership`` for a term)."""
        self._caught_up_since.clear()  # what an earlier term saw is stale
        while True:
            await self.clock.sleep(self.policy.interval_s)
            try:
                await self.step(self.clock.now())
            except (NotLeader, Timeout, ProposalDropped, StorageFull) as e:
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
        # Hosts: active, unreachable (no new work), dead (jobs fail over); GPU health.
        # A new leader first gives every host one election timeout to be heard.
        if self.jobs is not None and now - self.node.leader_since >= self._election_s():
            if await self._host_statuses(now, voters | learners):
                return
            if await self._gpu_health():
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
                    await self.propose(
                        encode_cluster(RemoveMember(at=self.clock.wall(), raft_id=v))
                    )
                    return
        for learner in sorted(learners):
            if (
                not self._alive(learner, now, 3 * p.dead_grace_s)
                and now - self._started(learner, now) > 3 * p.dead_grace_s
            ):
                log.info("removing dead learner %s", learner)
                await self.node.remove(learner)
                await self.propose(
                    encode_cluster(RemoveMember(at=self.clock.wall(), raft_id=learner))
                )
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

    def _gossip_member(self, node_id: str) -> MemberInfo | None:
        if self.gossip is None or self.gossip.running_since is None:
            return None
        return self.gossip.member(node_id)

    async def _host_statuses(self, now: float, configured: set[int]) -> bool:
        """Propose the first status change a host needs; True if one was proposed."""
        assert self.jobs is not None
        p = self.policy
        for m in self.cluster.members.values():
            node = self.jobs.nodes.get(m.node_id)
            if m.removed or m.raft_id == self.node.id or node is None:
                continue
            if node.status not in ("active", "unreachable"):
                continue
            silent: float | None = None
            if m.raft_id in configured:
                heard = self.node.last_heard.get(m.raft_id)
                silent = math.inf if heard is None else now - heard
            wanted = host_status(
                silent,
                self._gossip_member(m.node_id),
                now,
                election_s=self._election_s(),
                grace_s=p.dead_grace_s,
                watched_s=now - self._started(m.raft_id, now),
            )
            if wanted == "keep" or wanted == node.status:
                continue
            if wanted == "dead":
                log.warning(
                    "host %s unreachable for %.0fs (raft silent %s, gossip %s): marking it dead",
                    m.name,
                    p.dead_grace_s,
                    "n/a" if silent is None else f"{silent:.1f}s",
                    self._gossip_state(m.node_id),
                )
                await self.propose(
                    encode_cluster(NodeUnreachable(at=self.clock.wall(), node_id=m.node_id))
                )
            else:
                log.info(
                    "host %s is %s (raft silent %s, gossip %s)",
                    m.name,
                    wanted,
                    "n/a" if silent is None else f"{silent:.1f}s",
                    self._gossip_state(m.node_id),
                )
                await self.propose(
                    encode_cluster(
                        SetNodeStatus(at=self.clock.wall(), node_id=m.node_id, status=wanted)
                    )
                )
            return True
        return False

    def _gossip_state(self, node_id: str) -> str:
        info = self._gossip_member(node_id)
        return "n/a" if info is None else info.state.name.lower()

    async def _gpu_health(self) -> bool:
        """Bring replicated GPU health in line with what live hosts report through gossip;
        True if a command was proposed. Hosts gossip cannot hear keep their last verdict."""
        assert self.jobs is not None
        if self.gossip is None or self.gossip.running_since is None:
            return False
        for node in self.jobs.nodes.values():
            if node.status == "dead" or not node.gpus:
                continue
            info = self.gossip.member(node.node_id)
            if info is None or info.state not in (MemberState.ALIVE, MemberState.SUSPECT):
                continue
            unhealthy = parse_meta(info.meta).unhealthy
            if unhealthy is None:
                continue  # the host reports no health (yet)
            changes = []
            for g in node.gpus:
                reason = unhealthy.get(g.index)
                healthy, reason = reason is None, reason or ""
                if (g.healthy, g.health_reason) != (healthy, reason):
                    changes.append(GPUHealth(index=g.index, healthy=healthy, reason=reason))
            if changes:
                log.warning(
                    "host %s GPU health: %s",
                    node.name,
                    ", ".join(
                        f"gpu{c.index} {'healthy' if c.healthy else 'unhealthy (' + c.reason + ')'}"
                        for c in changes
                    ),
                )
                await self.propose(
                    encode(SetGPUHealth(at=self.clock.wall(), node_id=node.node_id, gpus=changes))
                )
                return True
        return False

    def _zones(self) -> dict[int, str]:
        nodes = self.jobs.nodes.values() if self.jobs is not None else ()
        by_node = {n.node_id: n.labels.get("zone", "") for n in nodes}
        return {m.raft_id: by_node.get(m.node_id, "") for m in self.cluster.members.values()}

    def _election_s(self) -> float:
        return election_window_s(self.node.options)

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
            encode_cluster(GrantCAKey(at=self.clock.wall(), raft_id=rid, sealed_hex=sealed.hex()))
        )
