"""Every node's view of its services' request rates (``meshgpu ps``, run views): the ingress
counters of all members, from gossip telemetry, sampled every second into a short history per
service, read over the service's scaling window (60 s without scaling, dstack's default).

The leader's autoscaler keeps its own history (a fresh one per term); this one only answers
"how busy is it", on any node."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.mesh.node_meta import service_key
from meshgpu.services.autoscaler import RateHistory

if TYPE_CHECKING:
    from meshgpu.state import RunRecord, StateMachine

DEFAULT_WINDOW_S = 60
NodeCounters = Mapping[str, Mapping[str, tuple[int, int]]]  # node -> service key -> (done, wait)


def all_counters(
    telemetry: Callable[[], NodeCounters],
    node_id: str,
    local: Callable[[], Mapping[str, tuple[int, int]]],
) -> dict[str, Mapping[str, tuple[int, int]]]:
    """Every member's ingress counters by node (node -> service key -> (done, waiting)): the
    others' from gossip, this node's straight from its ``ServiceCounters`` (fresher)."""
    nodes = {n: c for n, c in telemetry().items() if n != node_id}
    nodes[node_id] = {service_key(r): v for r, v in local().items()}
    return nodes


def window_s(run: RunRecord) -> int:
    service = run.spec.service
    windows = [g.scaling.window_s for g in service.groups if g.scaling] if service else []
    return max(windows, default=DEFAULT_WINDOW_S)


class ServiceRates:
    """Requests per second of every active service, as this node sees them."""

    def __init__(
        self,
        state: StateMachine,
        telemetry: Callable[[], NodeCounters],
        node_id: str,
        local: Callable[[], Mapping[str, tuple[int, int]]],
        domain: str | None = None,
        interval_s: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.state, self.telemetry, self.node_id, self.local = state, telemetry, node_id, local
        self.domain = domain  # --ingress-domain: the views' host-routed URLs
        self.interval_s, self.clock = interval_s, clock
        self.histories: dict[str, RateHistory] = {}

    async def run(self) -> None:
        while True:
            self.sample()
            await self.clock.sleep(self.interval_s)

    def sample(self) -> None:
        now = self.clock.wall()
        nodes = all_counters(self.telemetry, self.node_id, self.local)
        live = set()
        for run in self.state.runs.values():
            if run.spec.service is None or run.status.is_finished():
                continue
            live.add(run.run_id)
            key = service_key(run.run_id)
            history = self.histories.get(run.run_id)
            if history is None:
                history = self.histories[run.run_id] = RateHistory(keep_s=window_s(run))
            history.observe(now, {n: c[key][0] for n, c in nodes.items() if key in c})
        for run_id in [r for r in self.histories if r not in live]:
            del self.histories[run_id]

    def rps(self, run: RunRecord) -> float | None:
        """Requests per second over the service's window (None: not measured yet)."""
        history = self.histories.get(run.run_id)
        if history is None:
            return None
        rate = history.rate(self.clock.wall(), window_s(run))
        return rate.rps if rate is not None else None
