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

    def members_header(self) -> bytes:
        return b"http://peer-1:7480"

    def api_token_ok(self, token: str) -> bool:
        return token == TOKEN


def api(agent: StubAgent) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(agent)),  # type: ignore[arg-type]
        base_url="http://node",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
