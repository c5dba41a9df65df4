"""``meshgpu.testing.AgentProcess``: the one launcher of agent processes for tests and benches."""

from __future__ import annotations

import sys
from pathlib import Path

from meshgpu.testing import AgentProcess
from tests.agent.conftest import loopback_agent


def test_the_command_line_follows_the_options(tmp_path: Path) -> None:
    plain = AgentProcess(tmp_path, "a")
    argv = plain.argv("TOKEN", "10.0.0.1:7481")
    assert argv[:3] == [sys.executable, "-m", "meshgpu"]
    assert "--no-mdns" in argv and argv[argv.index("--log-level") + 1] == "warning"
    assert argv[-4:] == ["--token", "TOKEN", "--join", "10.0.0.1:7481"]
    assert int(argv[argv.index("--api-port") + 1]) == plain.api_port > 0
    assert "--bind" not in argv and not plain.data.exists()  # the agent makes its data dir

    ns = AgentProcess(
        tmp_path,
        "b",
        node_name="host-b",
        netns="ns1",
        bind="0.0.0.0",
        api_port=7480,
        peer_port=7481,
        mdns=True,
        log_level=None,
        extra=["--tick-ms", "50"],
    )
    argv = ns.argv()
    assert argv[:4] == ["ip", "netns", "exec", "ns1"]
    assert argv[argv.index("--bind") + 1] == "0.0.0.0"
    assert argv[argv.index("--name") + 1] == "host-b" and ns.data == tmp_path / "b"
    assert "--no-mdns" not in argv and "--log-level" not in argv
    assert argv[-2:] == ["--tick-ms", "50"] and "--token" not in argv


def test_a_restart_keeps_the_port_it_was_given_and_the_node(tmp_path: Path) -> None:
    a = loopback_agent(tmp_path, "agent", "1xH100:80GB")  # API port 0: whichever is free
    try:
        a.start()
        url, node = a.url, a.client().status()["node_id"]
        assert a.api_port != 0 and url.endswith(f":{a.api_port}")
        a.restart()
        assert a.url == url and a.client().status()["node_id"] == node
    finally:
        a.close()
    assert not a.alive() and a.clients == []
