"""Agents as separate processes inside the test's network namespaces (tests/e2e/netns.py), and
the polling helper the end-to-end tests wait with."""

from __future__ import annotations

import time
from pathlib import Path

from meshgpu.client import APIError
from meshgpu.testing import AgentProcess
from tests.e2e.netns import Host

API_PORT, PEER_PORT = 7480, 7481  # the defaults: every host has its own address


def ns_agent(
    host: Host,
    root: Path,
    name: str,
    *,
    fake_gpus: str = "1xH100:80GB",
    env: dict[str, str] | None = None,
    bind: str | None = None,
    extra: list[str] | None = None,
) -> AgentProcess:
    """An agent on ``host`` (inside its namespace) with the default ports on ``bind`` (the
    host's address unless given; with 0.0.0.0 the agent must find ``host.ip`` itself), mDNS on,
    fast Raft ticks and a 2 s dead grace. Start it with a join token to join by mDNS."""
    return AgentProcess(
        root,
        name,
        netns=host.ns,
        bind=bind or host.ip,
        api_port=API_PORT,
        peer_port=PEER_PORT,
        mdns=True,
        log_level=None,
        client_timeout=10,
        fake_gpus=fake_gpus,
        env=env,
        extra=["--tick-ms", "50", "--dead-grace", "2s", *(extra or [])],
    )


def wait_for(pred, timeout: float = 30, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except (APIError, OSError) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"condition not met in time (last error: {last})")
