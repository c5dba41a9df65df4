"""The RPS autoscaler as a leader controller: every ``interval_s`` it reads every node's ingress
counters from gossip telemetry (``MeshGossip.service_counters``; its own node's straight from
its ``ServiceCounters``), keeps a short request history per autoscaled service, applies
dstack's rule (``meshgpu.services.autoscaler``) to each replica group with ``scaling``, and
proposes ``ScaleService`` when a group's count should change.

Counters are telemetry, not Raft entries: only the decisions go through the log. The history
lives in this leader's memory -- a new leader starts with none and keeps the counts until it
has seen requests (scale-to-zero activation, from "waiting" requests, needs no history)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.mesh.node_meta import service_key
from meshgpu.services.autoscaler import RateHistory, desired_replicas
from meshgpu.services.rates import all_counters
from meshgpu.state import RunStatus, ScaleService, encode

if TYPE_CHECKING:
    from meshgpu.replica.proposer import Proposer
    from meshgpu.state import RunRecord, StateMachine

log = logging.getLogger(__name__)

INTERVAL_S = 1.0  # how often the leader samples the counters and decides

NodeCounters = Mapping[str, Mapping[str, tuple[int, int]]]  # node -> service key -> (done, wait)


def autoscaled(run: RunRecord) -> bool:
    service = run.spec.service
    return (
        service is not None
        and run.status not in (RunStatus.TERMINATING,)
        and not run.status.is_finished()
        and run.termination_reason is None
        and not run.awaiting_trigger  # a scheduled service between starts: nothing to scale
        and any(g.scaling is not None for g in service.groups)
    )


class Autoscaling:
    """One term's autoscaler (a fresh one per term: its history is its own)."""

    def __init__(
        self,
        state: StateMachine,
        proposer: Proposer,
        telemetry: Callable[[], NodeCounters],
        node_id: str,
        local: Callable[[], Mapping[str, tuple[int, int]]],
        interval_s: float = INTERVAL_S,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.state, self.proposer = state, proposer
        self.telemetry = telemetry  # the members' published counters, by node id
        self.node_id = node_id
        self.local = local  # this node's counters, by run id (ServiceCounters.snapshot)
        self.interval_s = interval_s
        self.clock = clock
        self.histories: dict[str, RateHistory] = {}  # run id -> its requests over time

    async def run(self) -> None:
        while True:
            await self.step()
            await self.clock.sleep(self.interval_s)

    async def step(self) -> None:
        now = self.clock.wall()
        nodes = all_counters(self.telemetry, self.node_id, self.local)
        live: set[str] = set()
        for run in list(self.state.runs.values()):
            if not autoscaled(run):
                continue
            live.add(run.run_id)
            service = run.spec.service
            assert service is not None
            key = service_key(run.run_id)
            keep = max(g.scaling.window_s for g in service.groups if g.scaling is not None)
            history = self.histories.get(run.run_id)
            if history is None:
                history = self.histories[run.run_id] = RateHistory(keep_s=keep)
            history.keep_s = keep
            history.observe(now, {n: c[key][0] for n, c in nodes.items() if key in c})
            waiting = any(c[key][1] > 0 for c in nodes.values() if key in c)
            total = sum(run.desired_replicas.get(g.name, g.min) for g in service.groups)
            activate = waiting and total == 0  # one group is brought up from zero
            for group in service.groups:
                if group.scaling is None:
                    continue
                current = run.desired_replicas.get(group.name, group.min)
                since = now - run.last_scaled_at.get(group.name, run.submitted_at)
                rate = history.rate(now, group.scaling.window_s)
                wanted = desired_replicas(
                    scaling=group.scaling,
                    low=group.min,
                    high=group.max,
                    current=current,
                    since_scaled_s=since,
                    rate=rate,
                    waiting=activate,
                )
                if wanted == current:
                    continue
                if activate and current == 0:
                    activate = False
                    reason = "requests waiting for a replica"
                else:
                    rps = rate.rps if rate is not None else 0.0
                    reason = (
                        f"{rps:.3g} req/s over {group.scaling.window_s}s, "
                        f"target {group.scaling.target:g} per replica"
                    )
                await self._propose(run.run_name, group.name, wanted, current, reason, now)
        for run_id in [r for r in self.histories if r not in live]:
            del self.histories[run_id]

    async def _propose(
        self, run_name: str, group: str, replicas: int, was: int, reason: str, now: float
    ) -> None:
        cmd = ScaleService(at=now, run_name=run_name, group=group, replicas=replicas, reason=reason)
        try:
            await self.proposer.propose(encode(cmd))
            log.info("run=%s group=%s scaled %d -> %d: %s", run_name, group, was, replicas, reason)
        except Exception as e:  # no quorum now: the next round decides again
            log.info("run=%s scaling deferred: %s", run_name, e)
