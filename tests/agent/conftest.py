"""Real agent processes on loopback, with fake GPUs, in a temporary data dir
(``meshgpu.testing.AgentProcess``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgpu.testing import AgentProcess


def loopback_agent(
    root: Path, name: str, fake_gpus: str, *, node_name: str = "test-node", **kw: object
) -> AgentProcess:
    """An agent as these tests run it: the agent's own defaults for ports (any), mDNS (on) and
    log level (info)."""
    opts: dict = {"api_port": 0, "peer_port": 0, "mdns": True, "log_level": None} | kw
    return AgentProcess(root, name, node_name=node_name, fake_gpus=fake_gpus, **opts)


def start_mesh(
    root: Path, specs: dict[str, str], extra: list[str] | None = None
) -> list[AgentProcess]:
    """Agents ``node-<name>`` with the fake GPUs of ``specs`` (in order): the first founds the
    cluster, the others join it with its token. Each gets a fixed peer port, so a restarted one
    rejoins as itself. On a failure to start, those started are stopped again."""
    agents: list[AgentProcess] = []
    try:
        for name, gpus in specs.items():
            ag = loopback_agent(
                root, name, gpus, node_name=f"node-{name}", peer_port=None, extra=extra or []
            )
            agents.append(ag)
            if len(agents) == 1:
                ag.start()
            else:
                ag.start(agents[0].join_token(), agents[0].url)
    except BaseException:
        stop_all(agents)
        raise
    return agents


def stop_all(agents: list[AgentProcess]) -> None:
    for ag in agents:
        ag.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    yield from running(
        loopback_agent(tmp_path, "agent", "8xH100:80GB", env={"MESHGPU_CODE_LIMIT_MB": "1"})
    )


def running(a: AgentProcess) -> Iterator[AgentProcess]:
    """Start ``a`` for a fixture to yield; closed (with its jobs) afterwards."""
    try:
        yield a.start()
    finally:
        a.close()


def wait_for(predicate, timeout: float = 30, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
