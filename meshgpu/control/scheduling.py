"""The scheduler as a leader controller: place waiting jobs whenever demand or capacity
changes (the state's ``demand_version`` moved) or a retry backoff ends."""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

import trio

from consensus.storage import StorageFull
from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.replica.leadership import election_window_s
from meshgpu.scheduler import SchedulerIndex, plan
from meshgpu.state import AssignJobs, PreemptJobs, Result, SetPendingReasons, encode

if TYPE_CHECKING:
    from consensus.node import RaftNode
    from meshgpu.replica.proposer import Proposer
    from meshgpu.state import StateMachine
    from meshgpu.state.cluster import ClusterState

log = logging.getLogger(__name__)

MAX_REASONS = 2000  # why-pending reasons per Raft entry
STORAGE_FULL_RETRY_S = 1.0  # a leader whose disk refused the decisions plans again after this


class Demand:
    """Set at every applied entry (the state may hold new demand); the scheduler waits on it."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, deadline: float) -> bool:
        """Until notified (True) or trio time ``deadline`` (False); then cleared."""
        with trio.move_on_at(deadline) as timer:
            await self._event.wait()
        self._event = trio.Event()
        return not timer.cancelled_caught


class Scheduling:
    """One term's scheduler (a fresh one per term: the why-pending reasons it proposed are its
    own, another leader may have set others meanwhile)."""

    def __init__(
        self,
        node: RaftNode,
        state: StateMachine,
        cluster: ClusterState,
        proposer: Proposer,
        demand: Demand,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.node, self.state, self.cluster = node, state, cluster
        self.clock = clock
        self.proposer = proposer
        self.demand = demand
        self.retry_s = node.options.tick_s  # the pause after a refused or failed decision
        # The scheduler's indexes of the state (wait queue, hosts), this term's own: built at
        # the first plan, then fed from the state's change feed.
        self.index = SchedulerIndex()

    def _hosts_heard(self) -> bool:
        """Has this leader heard from every host the state calls active since it took over?"""
        node = self.node
        since = node.leader_since
        for m in self.cluster.members.values():
            if m.removed or m.raft_id == node.id:
                continue
            record = self.state.nodes.get(m.node_id)
            if record is None or record.status != "active":
                continue
            heard = node.last_heard.get(m.raft_id)
            if heard is None or heard < since:
                return False
        return True

    async def run(self) -> None:
        node, state = self.node, self.state
        propose, clock = self.proposer.propose, self.clock
        reasons: dict[str, str] = {}  # why-pending reasons this leader last proposed
        seen = -1
        wake = float("inf")  # clock.now() to plan again unasked: a retry backoff ends
        # A new leader first learns which hosts answer, so nothing new is placed on a host
        # that died with the old leader: it waits until every active host has been heard since
        # it took over, or was marked unreachable by the membership manager (after one
        # election window); never longer than two.
        heard_cap = node.leader_since + 2 * election_window_s(node.options)
        due = True  # a new term plans at once
        while True:
            if not due:
                due = not await self.demand.wait(wake)
                if due:
                    wake = float("inf")
            if state.demand_version == seen and not due:
                continue
            due = False
            if clock.now() < heard_cap and not self._hosts_heard():
                wake = min(wake, clock.now() + self.retry_s)
                continue
            seen = state.demand_version
            now = clock.wall()
            p = plan(state, now, index=self.index, quotas=self.cluster.access.quotas())
            wake = float("inf")
            if p.wake_at is not None:
                wake = clock.now() + max(0.0, p.wake_at - now) + 0.01
            # Only reasons that differ from what the state holds; the set difference runs in C
            # (a deep queue makes this the scheduler's hottest line otherwise). At most
            # MAX_REASONS per entry: the rest go with the next plan, which comes at once.
            diff = {
                j: why
                for j, why in dict(p.pending.items() - reasons.items()).items()
                if j in state.jobs and state.jobs[j].why_pending != why
            }
            changed = dict(itertools.islice(diff.items(), MAX_REASONS))
            if len(changed) < len(diff):
                reasons = {j: w for j, w in p.pending.items() if j not in diff or j in changed}
                seen, wake = -1, min(wake, clock.now())
            else:
                reasons = p.pending
            try:
                if p.preemptions:
                    await propose(encode(PreemptJobs(at=now, preemptions=p.preemptions)))
                if p.assignments:
                    cmd = AssignJobs(at=now, assignments=p.assignments, pending_reasons=changed)
                    res = await propose(encode(cmd))
                    if isinstance(res, Result) and res.ok and (res.value or {}).get("refused"):
                        # Stale: the state bumped demand, so the next plan comes at once; a
                        # tick's pause keeps a decision refused again and again from
                        # flooding the log.
                        await clock.sleep(self.retry_s)
                elif changed:
                    await propose(encode(SetPendingReasons(at=now, reasons=changed)))
            except Exception as e:  # lost leadership or quorum meanwhile: plan again later
                log.warning("scheduler decisions not committed (%s); will plan again", e)
                reasons, seen = {}, -1
                await clock.sleep(
                    STORAGE_FULL_RETRY_S if isinstance(e, StorageFull) else self.retry_s
                )
                self.demand.notify()
