"""The user's working directory reaches the host that runs the job, in network namespaces.

A run is submitted (with its code upload) through an agent that cannot run it -- its GPU is the
wrong model -- so the job lands on another host, which must get the archive: fetched from the
accepting node, or, when that node was SIGKILLed after acknowledging the upload, from the members
it copied the upload to. The job prints the uploaded file; its output comes back through the
API. The first mesh also runs every agent with ``--bind 0.0.0.0``: each must register (and
advertise) its namespace's address, which the job sees as ``MESHGPU_MASTER_NODE_IP``."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshgpu.client import Client, make_archive
from meshgpu.testing import AgentProcess
from tests.e2e.agents import ns_agent, wait_for
from tests.e2e.netns import Host, Net, available

REASON = available()
if REASON and os.environ.get("CI") == "true":
    raise RuntimeError(f"under CI these tests must run: {REASON}")
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON or "ok")

TASK = """\
type: task
commands:
  - cat data.txt
  - echo master=$MESHGPU_MASTER_NODE_IP
resources:
  gpu: H100:1
"""
PAYLOAD = "payload-from-the-laptop"


class Lab:
    """The namespaces and agents a test made, all removed after it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nets: list[Net] = []
        self.agents: list[AgentProcess] = []

    def hosts(self, count: int) -> list[Host]:
        self.nets.append(Net.create(count))
        return self.nets[-1].hosts

    def start(self, host: Host, name: str, token: str | None = None, **kw: Any) -> AgentProcess:
        agent = ns_agent(host, self.root, name, **kw)
        self.agents.append(agent)  # before start: a failed start is cleaned up too
        return agent.start(token, timeout=90)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        for a in lab.agents:
            a.close()
        for n in lab.nets:
            n.delete()


def _project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "data.txt").write_text(PAYLOAD + "\n")
    (proj / "task.yml").write_text(TASK)
    return proj


def _logs(c: Client, run: str) -> str:
    return b"".join(c.logs(run)).decode()


def test_a_job_on_another_host_fetches_the_upload_from_the_accepting_node(
    lab: Lab, tmp_path: Path
) -> None:
    ha, hb = lab.hosts(2)
    # No copies: the only way for b to get the code is to fetch it from a.
    a = lab.start(ha, "a", fake_gpus="1xA100:40GB", bind="0.0.0.0", extra=["--code-copies", "0"])
    # b joins through a's *peer* address, as INTERFACE.md writes it (not by mDNS).
    b = lab.start(
        hb,
        "b",
        a.join_token(),
        fake_gpus="1xH100:80GB",
        bind="0.0.0.0",
        extra=["--join", f"{ha.ip}:7481", "--no-mdns"],
    )
    for x, h in (
        (a, ha),
        (b, hb),
    ):  # the API URL it advertises is its namespace's address, not 0.0.0.0
        profile = tomllib.loads((x.data / "client.toml").read_text())
        assert profile["url"] == x.url == f"https://{h.ip}:7480"
    c = a.client()
    nodes = wait_for(lambda: (n := c.nodes()) and len(n) == 2 and n, timeout=60)
    assert {n["name"]: n["internal_ip"] for n in nodes} == {"a": ha.ip, "b": hb.ip}

    proj = _project(tmp_path)
    r = a.cli("submit", "-f", "task.yml", "--name", "fetched", cwd=proj)
    assert r.returncode == 0 and r.stdout.strip() == "fetched", r.stdout + r.stderr
    run = wait_for(
        lambda: (x := c.run("fetched")) and x["status"] in ("done", "failed") and x, timeout=90
    )
    job = run["jobs"][0]
    assert run["status"] == "done" and job["node"] == "b", run
    out = _logs(c, "fetched")  # through a, proxied from b
    assert PAYLOAD in out and f"master={hb.ip}" in out, out
    [archive] = (a.data / "code").glob("*.tar.gz")
    assert (b.data / "code" / archive.name).read_bytes() == archive.read_bytes()


def test_the_run_starts_after_the_accepting_node_is_killed(lab: Lab, tmp_path: Path) -> None:
    ha, hc, hd, hb = lab.hosts(4)
    a = lab.start(ha, "a", fake_gpus="1xA100:40GB")
    others = [
        lab.start(h, n, a.join_token(), fake_gpus="1xA100:40GB") for h, n in ((hc, "c"), (hd, "d"))
    ]
    c = a.client()
    wait_for(lambda: len(c.status()["voters"]) == 3 and len(c.nodes()) == 3, timeout=60)

    # Upload and submit through a; no member can run it yet (no H100 in the mesh).
    data, sha = make_archive(_project(tmp_path))
    up = c.upload_code(data, sha)
    assert sorted(up["copies"]) == ["c", "d"], up  # copied before the upload was acknowledged
    c.submit(TASK, name="durable", code_sha256=sha, request_id="req-durable")
    assert c.run("durable")["status"] in ("submitted", "pending"), c.run("durable")

    a.kill()  # the node that accepted the upload and the run is gone for good
    lab.start(hb, "b", a.join_token(), fake_gpus="1xH100:80GB")  # joins through c or d (mDNS)
    cc = others[0].client()
    run = wait_for(
        lambda: (x := cc.run("durable")) and x["status"] in ("done", "failed") and x, timeout=120
    )
    assert run["status"] == "done" and run["jobs"][0]["node"] == "b", run
    assert PAYLOAD in _logs(cc, "durable")
    # b never received a copy (it joined later): it fetched one from a holder, not from a.
    log = (tmp_path / "b.log").read_text()
    assert f"code={sha[:12]} fetched from c" in log or f"code={sha[:12]} fetched from d" in log
