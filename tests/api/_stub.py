"""The API app in-process over the real use cases (``meshgpu/ops``) and a plain state machine:
the Raft node is a stub that reports a lone leader and proposes by applying at once, so API
behaviour is tested without processes or clocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from meshgpu.api import create_app
from meshgpu.gpu import FakeProvider
from meshgpu.ops import (
    AccessOps,
    Admission,
    ClusterInfo,
    Code,
    Logs,
    Metrics,
    NoPeers,
    Runs,
    Services,
    SSHKeys,
    Tokens,
)
from meshgpu.runner import ProcessRunner
from meshgpu.runner.code import CodeStore
from meshgpu.security import NodeIdentity, create_cluster
from meshgpu.state import Result, StateMachine
from meshgpu.state.cluster import Replicated

TOKEN = "test-token"


class _Node:
    """The Raft node as the use cases see it: a lone leader."""

    id = 1
    leader = 1

    def __init__(self, state: StateMachine) -> None:
        self.state = state

    @property
    def applied(self) -> int:
        return self.state.applied_index

    def status(self) -> dict[str, Any]:
        return {
            "id": 1,
            "role": "leader",
            "term": 7,
            "leader": 1,
            "commit": self.state.applied_index,
            "applied": self.state.applied_index,
            "last_index": self.state.applied_index,
            "voters": [1],
            "learners": [],
        }

    async def read_index(self, timeout: float) -> None:
        return None


class Proposer:
    """Applies each command to the state at once (a one-member log that never fails)."""

    def __init__(self, replicated: Replicated) -> None:
        self.replicated = replicated
        self.proposed: list[bytes] = []

    async def propose(self, cmd: bytes, request_id: bytes | None = None) -> Result:
        self.proposed.append(cmd)
        index = self.replicated.jobs.applied_index + 1
        return self.replicated.apply([(index, cmd)])[0]


class _Gossip:
    """No gossip running: what ``GET /api/v1/nodes`` reads of it."""

    def node_view(self, node_id: str) -> dict[str, Any] | None:
        return None

    def telemetry(self, node_id: str) -> list[dict[str, Any]] | None:
        return None

    def summary(self, registered: set[str]) -> dict[str, Any]:
        return {"running": False}


class _Cluster(ClusterInfo):
    def members_header(self) -> bytes:
        return b"http://peer-1:7480"

    def roles(self) -> dict[str, str]:
        return {self.node_id: "leader"}


class StubServices(Services):
    async def local_telemetry(self) -> list[dict[str, Any]]:
        return [
            {"index": t.index, "utilization_pct": t.utilization_pct} for t in self.gpus.telemetry()
        ]


def StubAgent(state: StateMachine, tmp: Path, node_id: str = "n1") -> StubServices:  # noqa: N802
    """The services of a lone node ``node_id`` over ``state`` (named for what it replaced)."""
    node: Any = _Node(state)
    replicated = Replicated()
    replicated.jobs = state
    proposer = Proposer(replicated)
    cluster = replicated.cluster
    cluster.cluster_id = "cluster-1"
    runner = ProcessRunner(tmp / "jobs", use_launcher=False)
    store = CodeStore(tmp / "code", limit=1 << 20)
    tls = NodeIdentity(tmp / "tls")
    create_cluster(tls, 1, ("127.0.0.1",))  # this lone node holds the CA key (a voter)
    access = AccessOps(proposer, cluster, state, tls.files.ca_cert.read_bytes, tls.ca_key_path)

    peers = NoPeers()  # a lone node: no other member to call
    gpus = FakeProvider("8xH100:80GB", seed=node_id)
    return StubServices(
        node_id=node_id,
        node_name=node_id,
        state=state,
        cluster=_Cluster(
            node, state, cluster, node_id, node_id, "", lambda: TOKEN, lambda: "no CA"
        ),
        runs=Runs(state, proposer, store, node_id, access.check_references),
        access=access,
        logs=Logs(state, runner, node_id, peers),
        metrics=Metrics(state, runner, gpus, node_id, node_id, peers),
        code=Code(store, state, node_id, copies=0, limit=1 << 20),
        tokens=Tokens(proposer, lambda: "cluster-1", lambda: "0" * 64),
        admission=Admission(node, cluster, tls, proposer, lambda: TOKEN, peers),
        gossip=_Gossip(),
        gpus=gpus,
        runner=runner,
        ssh_keys=SSHKeys(proposer, cluster),
    )


def api(services: Services) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(services)),
        base_url="http://node",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
