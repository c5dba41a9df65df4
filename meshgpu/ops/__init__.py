"""Use cases as plain async code over a proposer and the replicated state: what the API calls.
They raise ``meshgpu.errors`` and never speak HTTP (no FastAPI here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from meshgpu.ops.access import AccessOps
from meshgpu.ops.admission import Admission
from meshgpu.ops.backends import Backends
from meshgpu.ops.cluster import ClusterInfo
from meshgpu.ops.code import Code
from meshgpu.ops.fleets import Fleets
from meshgpu.ops.logs import Logs, LogSource
from meshgpu.ops.metrics import Metrics
from meshgpu.ops.peers import NoPeers, Peers
from meshgpu.ops.runs import Runs, Submission
from meshgpu.ops.sshkeys import SSHKeys
from meshgpu.ops.tokens import Tokens
from meshgpu.services.stats import ServiceCounters

if TYPE_CHECKING:
    from meshgpu.devenv.tunnel import Tunnels
    from meshgpu.gpu import GPUProvider
    from meshgpu.runner import ProcessRunner
    from meshgpu.services.ingress import Ingress
    from meshgpu.services.rates import ServiceRates
    from meshgpu.state import StateMachine


class GossipView(Protocol):
    """What the API shows of this node's gossip (``meshgpu/mesh/node_gossip.py``)."""

    def node_view(self, node_id: str) -> dict[str, Any] | None: ...

    def telemetry(self, node_id: str) -> list[dict[str, Any]] | None: ...

    def summary(self, registered: set[str]) -> dict[str, Any]: ...


@dataclass
class Services:
    """Everything the API depends on, built by the composition root once the parts exist."""

    node_id: str
    node_name: str
    state: StateMachine  # the replicated state, read locally
    cluster: ClusterInfo
    runs: Runs
    logs: Logs
    metrics: Metrics
    code: Code
    tokens: Tokens
    admission: Admission
    gossip: GossipView
    gpus: GPUProvider
    runner: ProcessRunner
    # The ingress (meshgpu/services/ingress.py); None: the app builds one with defaults.
    ingress: Ingress | None = None
    # This node's ingress counters (the one instance: the ingress counts, gossip publishes
    # them for the leader's autoscaler, /metrics reads them).
    counters: ServiceCounters = field(default_factory=ServiceCounters)
    # Every service's request rate as this node sees it (run views, ps); None: not measured.
    rates: ServiceRates | None = None
    # The way into jobs through this node (``meshgpu ssh-proxy``); None: the app builds one.
    tunnels: Tunnels | None = None
    # Users' SSH public keys (``/api/v1/ssh/keys``); None: the app answers 503.
    ssh_keys: SSHKeys | None = None
    # SSH fleets (``/api/v1/fleets``); None: the app answers 503.
    fleets: Fleets | None = None
    # Cloud backends (``/api/v1/backends``); None: the app answers 503.
    backends: Backends | None = None
    # Users, projects, members, secrets, audit (``/api/v1/users``, ``/projects``, ``/audit``);
    # None: the app answers 503.
    access: AccessOps | None = None

    async def local_telemetry(self) -> list[dict[str, Any]]:
        """A fresh sample of this host's GPUs (a blocking driver call: in a worker thread)."""
        samples = await trio.to_thread.run_sync(self.gpus.telemetry)
        return [dataclasses.asdict(t) for t in samples]


__all__ = [
    "AccessOps",
    "Backends",
    "Admission",
    "ClusterInfo",
    "Code",
    "Fleets",
    "GossipView",
    "LogSource",
    "Logs",
    "Metrics",
    "NoPeers",
    "Peers",
    "Runs",
    "SSHKeys",
    "Services",
    "Submission",
    "Tokens",
]
