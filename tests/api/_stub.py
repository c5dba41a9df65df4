"""The API app in-process over a plain state machine: an agent that is only what the routes
read (state, Raft status, GPUs, the job directory), so API behaviour is tested without
processes or clocks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from meshgpu.api import create_app
from meshgpu.gpu import FakeProvider
from meshgpu.runner import ProcessRunner
from meshgpu.state import StateMachine

TOKEN = "test-token"


class _Node:
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


class _Gossip:
    """No gossip running: what ``GET /api/v1/nodes`` reads of it."""

    def node_view(self, node_id: str) -> dict[str, Any] | None:
        return None

    def telemetry(self, node_id: str) -> list[dict[str, Any]] | None:
        return None

    def summary(self, registered: set[str]) -> dict[str, Any]:
        return {"running": False}


class StubAgent:
    def __init__(self, state: StateMachine, tmp: Path, node_id: str = "n1") -> None:
        self.state = state
        self.node = _Node(state)
        self.node_id = node_id
        self.node_name = node_id
        self.settings = SimpleNamespace(code_limit=1 << 20)
        self.cluster = SimpleNamespace(cluster_id="cluster-1")
        self.identity: dict[str, Any] = {}
        self.gpus = FakeProvider("8xH100:80GB", seed=node_id)
        self.runner = ProcessRunner(tmp / "jobs", use_launcher=False)
        self.gossip = _Gossip()

    def members_header(self) -> bytes:
        return b"http://peer-1:7480"

    def roles(self) -> dict[str, str]:
        return {self.node_id: "leader"}

    async def local_telemetry(self) -> list[dict[str, Any]]:
        return [
            {"index": t.index, "utilization_pct": t.utilization_pct} for t in self.gpus.telemetry()
        ]

    def api_token_ok(self, token: str) -> bool:
        return token == TOKEN


def api(agent: StubAgent) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(agent)),  # type: ignore[arg-type]
        base_url="http://node",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
