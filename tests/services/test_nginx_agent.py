"""A real agent process started with ``--data-plane nginx`` (API over TLS, the default): nginx
owns the API port and serves a service end to end -- the service path natively, the model
endpoint and the API through the agent behind it -- and goes when the agent goes; and the flag's
clear refusal when no nginx is installed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from meshgpu.client import make_archive
from meshgpu.services.nginx_conf import service_id
from meshgpu.testing import AgentProcess, free_port
from tests.services._nginx_harness import needs_nginx

OPENAI = Path(__file__).resolve().parents[2] / "examples" / "service-openai"
MODEL = "meshgpu/echo-small"


def _nginx_pids(conf: Path) -> list[int]:
    """The master that reads ``conf`` and its workers (in its process group)."""
    masters, stats = [], {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(proc.name)] = stat
        if str(conf).encode() in cmd and stat[0] != "Z":
            masters.append(int(proc.name))
    # stat after the name: state, ppid, pgrp
    return [p for p, st in stats.items() if st[0] != "Z" and int(st[2]) in masters]


@needs_nginx
def test_agent_with_nginx_data_plane(tmp_path: Path) -> None:
    port = free_port()
    config = (OPENAI / "service.dstack.yml").read_text()
    config = config.replace("port: 8000\n", f"port: {port}\n").replace(
        "replicas: 2\n", "replicas: 1\n"
    )
    agent = AgentProcess(tmp_path, "a", extra=["--data-plane", "nginx"])
    conf = agent.data / "nginx" / "nginx.conf"
    try:
        agent.start()
        assert _nginx_pids(conf), agent.log_tail()
        c = agent.client()  # the API through nginx (TLS with the node's certificate)
        data, sha = make_archive(OPENAI)
        c.upload_code(data, sha)
        name = c.submit(config, code_sha256=sha)["name"]
        run_id = c.run(name)["id"]
        http = httpx.Client(verify=agent.verify, timeout=10)
        svc = f"{agent.url}/proxy/services/main/{name}"
        auth = {"Authorization": f"Bearer {agent.token}"}
        deadline = time.monotonic() + 60
        # Ready: nginx serves the service itself (an upstream in its configuration).
        while f"upstream {service_id(run_id)} " not in conf.read_text():
            assert time.monotonic() < deadline, agent.log_tail()
            time.sleep(0.2)
        time.sleep(0.5)
        r = http.get(f"{svc}/health", headers=auth)
        assert r.status_code == 200 and r.json()["model"] == MODEL, r.text
        r = http.get(f"{svc}/health")
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        # The model endpoint (the agent, behind nginx), streaming, with the real client.
        client = openai.OpenAI(
            base_url=f"{agent.url}/proxy/models/main",
            api_key=agent.token,
            http_client=http,
            max_retries=0,
        )
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "through nginx"}], stream=True
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert text == "Echo: through nginx"
        # nginx's access log feeds /metrics (and the autoscaler's counters).
        for _ in range(3):
            assert http.get(f"{svc}/health", headers=auth).status_code == 200
        want = f'service="{name}"}} 5.0'  # 4 by nginx, the completion by the agent
        deadline = time.monotonic() + 15
        while True:
            metrics = http.get(f"{agent.url}/metrics", headers=auth).text
            if any(
                line.startswith("meshgpu_service_requests_total") and want in line
                for line in metrics.splitlines()
            ):
                break
            assert time.monotonic() < deadline, metrics
            time.sleep(0.3)
        client.close()
        http.close()
        pids = _nginx_pids(conf)
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        agent.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids):  # stopped with the agent
            assert time.monotonic() < deadline, pids
            time.sleep(0.1)
    finally:
        agent.close()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@needs_nginx
def test_stale_nginx_of_a_killed_agent_is_stopped(tmp_path: Path) -> None:
    """SIGKILL the agent: its nginx dies with it (PR_SET_PDEATHSIG); the next start serves."""
    agent = AgentProcess(tmp_path, "a", extra=["--data-plane", "nginx"])
    conf = agent.data / "nginx" / "nginx.conf"
    try:
        agent.start()
        pids = _nginx_pids(conf)
        assert pids
        assert agent.proc is not None
        agent.proc.kill()
        agent.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids):
            assert time.monotonic() < deadline, pids
            time.sleep(0.1)
        agent.start()
        assert agent.client().nodes()
    finally:
        agent.close()


def test_data_plane_nginx_without_nginx_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshgpu.cli import app
    from meshgpu.services import nginx

    monkeypatch.setattr(nginx, "find_nginx", lambda: None)
    result = CliRunner().invoke(
        app, ["agent", "--data-dir", str(tmp_path / "d"), "--data-plane", "nginx"]
    )
    assert result.exit_code != 0
    assert "--data-plane nginx needs an nginx binary" in result.output
    assert "apt-get install nginx-light" in result.output
    result = CliRunner().invoke(
        app, ["agent", "--data-dir", str(tmp_path / "d"), "--data-plane", "bogus"]
    )
    assert result.exit_code != 0 and "--data-plane takes embedded or nginx" in result.output


def test_find_nginx(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshgpu.services import nginx

    monkeypatch.setattr(nginx.shutil, "which", lambda _: None)
    monkeypatch.setattr(nginx.os, "access", lambda p, _: p == "/usr/sbin/nginx")
    assert nginx.find_nginx() == "/usr/sbin/nginx"
    monkeypatch.setattr(nginx.os, "access", lambda p, _: False)
    assert nginx.find_nginx() is None
    assert os.path.basename(__file__).startswith("test_nginx")
