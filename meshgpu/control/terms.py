"""The controllers a leader runs for each term (``Leadership`` starts them and cancels them at
step-down): scheduling, retention, membership, gossip keys, the services' autoscaler, the
starts of scheduled runs, the SSH fleets, the re-encryption of secrets after a key rotation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from meshgpu.clock import Clock
from meshgpu.control.autoscaling import Autoscaling
from meshgpu.control.fleets import FleetController
from meshgpu.control.gossip_keys import GossipKeys
from meshgpu.control.retention import Retention
from meshgpu.control.schedules import Schedules
from meshgpu.control.scheduling import Demand, Scheduling

if TYPE_CHECKING:
    from meshgpu.replica.proposer import Proposer
    from meshgpu.settings import AgentSettings
    from meshgpu.state import StateMachine


def leader_controllers(
    node: Any,
    state: StateMachine,
    cluster: Any,
    proposer: Proposer,
    demand: Demand,
    membership: Callable[[], Awaitable[None]],
    telemetry: Callable[[], Mapping[str, Mapping[str, tuple[int, int]]]],
    node_id: str,
    local_counters: Callable[[], Mapping[str, tuple[int, int]]],
    settings: AgentSettings,
    clock: Clock,
    fleets: Callable[[], FleetController] | None = None,
    backend_fleets: Callable[[], Any] | None = None,
    secret_keys: Callable[[], Awaitable[None]] | None = None,
) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    """(name, start) of each controller; a fresh controller per term where it keeps history."""
    s = settings
    retention = Retention(
        state, proposer, s.keep_runs, s.keep_runs_for_s, s.retention_interval_s, clock=clock
    )
    out: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("scheduling", lambda: Scheduling(node, state, cluster, proposer, demand, clock).run()),
        ("retention", retention.run),
        ("membership", membership),
        ("gossip-keys", GossipKeys(cluster, proposer, clock=clock).run),
        (
            "autoscaling",
            lambda: Autoscaling(
                state, proposer, telemetry, node_id, local_counters, clock=clock
            ).run(),
        ),
        ("schedules", Schedules(state, proposer, clock=clock).run),
    ]
    if fleets is not None:  # SSH fleets: a fresh controller per term (its state is in Raft)
        out.append(("fleets", lambda: fleets().run()))
    if backend_fleets is not None:  # backend fleets: likewise (meshgpu/control/backend_fleets.py)
        out.append(("backend-fleets", lambda: backend_fleets().run()))
    if secret_keys is not None:  # re-encryption after a data key rotation (secret_keys.py)
        out.append(("secret-keys", secret_keys))
    return out
