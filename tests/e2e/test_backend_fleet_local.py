"""Backend fleets end to end with the ``local`` plugin: a one-member mesh with no GPUs (in a
network namespace of the test's own bridge); ``meshgpu backend add local --bridge`` that bridge,
with fake GPUs on its instances (the member runs in this namespace, bound to the bridge's
address, as the plugin's docs say); a fleet ``nodes: 0..2, idle_duration: 20s``. A 1-GPU task
provisions one instance (a fresh namespace whose user data starts the agent file with a join
token), which joins with the backend's labels and runs it; idle for 20 s, it is terminated and
leaves the mesh; with ``nodes: 1..2`` one instance is kept. Bad input: wrong settings at
``backend add`` are refused there, and a ``max_price`` no offer meets shows in why-pending."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgpu.testing import AgentProcess
from tests.e2e.agents import API_PORT, PEER_PORT, wait_for
from tests.e2e.netns import Net, available

REASON = available()
if REASON and os.environ.get("CI") == "true":
    raise RuntimeError(f"under CI these tests must run: {REASON}")
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON or "ok")

FLEET = """\
type: fleet
name: cloud
nodes: {nodes}
idle_duration: 20s
{extra}"""

TASK = """\
type: task
name: {name}
commands:
  - echo gpus=$(echo $CUDA_VISIBLE_DEVICES) on $(hostname)
resources:
  gpu: 1
  cpu: 1..
  memory: 0.1GB..
  disk: 1GB..
{extra}"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:  # type: ignore[type-arg]
    from meshgpu.fleets.pyz import build

    root = tmp_path_factory.mktemp("bfleet")
    pyz = build(root / "dist" / "meshgpu.pyz")
    net = Net.create(0)  # only the bridge: the member runs here, bound to its address
    state_dir = root / "local-backend"
    agent = AgentProcess(
        root,
        "m1",
        bind=f"10.213.{net.subnet}.254",
        api_port=API_PORT,
        peer_port=PEER_PORT,
        mdns=False,
        log_level=None,
        client_timeout=10,
        fake_gpus="",
        env={"MESHGPU_AGENT_PYZ": str(pyz)},
        extra=["--tick-ms", "50", "--dead-grace", "2s"],
    )
    try:
        agent.start(None)
        wait_for(lambda: len(agent.client().nodes()) == 1, timeout=60)
        yield {"net": net, "agent": agent, "root": root, "state_dir": state_dir, "pyz": pyz}
    finally:
        agent.close()
        from plugins.local import LocalBackend

        b = LocalBackend("local", {"state_dir": str(state_dir), "bridge": net.bridge})
        for ref in b.list({}):
            b.terminate(ref)
        net.delete()


def _fleet(agent: AgentProcess) -> dict:  # type: ignore[type-arg]
    return agent.client()._request("GET", "/api/v1/fleets/cloud").json()  # noqa: SLF001


def _netns() -> set[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in r.stdout.splitlines() if line.startswith("mgl")}


def test_local_backend_fleet(world: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    agent, net = world["agent"], world["net"]
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home)}

    # Bad input at backend add: a bridge that does not exist is refused there, with the reason.
    r = agent.cli("backend", "add", "local", "--bridge", "nosuchbr0", env=env)
    assert r.returncode != 0 and "no bridge nosuchbr0" in (r.stdout + r.stderr), r.stdout + r.stderr
    r = agent.cli(
        "backend",
        "add",
        "local",
        "--bridge",
        net.bridge,
        "-o",
        f"state_dir={world['state_dir']}",
        "-o",
        "gpus=1xH100:80GB",
        "-o",
        "price=2",
        "-o",
        "memory_gb=4",
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = agent.cli("backend", "ls", env=env)
    assert "local" in r.stdout and net.bridge in r.stdout, r.stdout

    before = _netns()
    proj = tmp_path / "proj"
    proj.mkdir()
    f = proj / "fleet.yml"
    f.write_text(FLEET.format(nodes="0..2", extra=""))
    r = agent.cli("apply", "-f", str(f), "-y", env=env)
    assert r.returncode == 0, r.stdout + r.stderr

    # max_price no offer meets: why-pending says so (and nothing is bought).
    (proj / "cheap.yml").write_text(TASK.format(name="cheap", extra="max_price: 0.5\n"))
    r = agent.cli("apply", "-f", "cheap.yml", "-y", "-d", cwd=proj, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    c = agent.client()
    job = wait_for(
        lambda: "no offer meets" in ((j := c.run("cheap")["jobs"][0])["why_pending"] or "") and j,
        timeout=30,
    )
    assert "max_price" in job["why_pending"], job
    assert not _fleet(agent)["instances"]
    r = agent.cli("stop", "cheap", "-y", env=env)

    # 1. A 1-GPU task buys one instance; it boots, joins, runs the task.
    (proj / "task.yml").write_text(TASK.format(name="gpu1", extra=""))
    r = agent.cli("apply", "-f", "task.yml", "-y", "-d", cwd=proj, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(
        lambda: "provisioning on fleet cloud" in (c.run("gpu1")["jobs"][0]["why_pending"] or ""),
        timeout=30,
    )
    run = wait_for(lambda: (x := c.run("gpu1")) and x["status"] == "done" and x, timeout=180)
    inst = _fleet(agent)["instances"]
    assert len(inst) == 1, inst
    assert run["jobs"][0]["node"] == "cloud-0", run
    nodes = {n["name"]: n for n in c.nodes()}
    labels = nodes["cloud-0"]["labels"]
    assert labels["backend"] == "local" and labels["instance_type"] == "local", labels
    assert labels["region"] == "local" and labels["fleet"] == "cloud", labels
    assert len(_netns() - before) == 1
    # The instance fetched the agent file from the member (its download secret, the cluster
    # CA pinned), not from a path on this machine: as a cloud VM does.
    (ud,) = world["state_dir"].glob("mgl*/user-data.sh")
    text = ud.read_text()
    assert "/api/v1/agent/meshgpu.pyz" in text and "ctx.check_hostname = False" in text
    assert str(world["pyz"]) not in text
    assert f"'https://10.213.{net.subnet}.254:{API_PORT}'" in text, text[:2000]
    r = agent.cli("fleet", "ls", env=env)
    assert "backend" in r.stdout and "$2" in r.stdout and "idle" in r.stdout, r.stdout

    # 2. Idle for idle_duration (20 s): terminated, out of the mesh, its namespace gone.
    wait_for(lambda: not _fleet(agent)["instances"], timeout=90)
    wait_for(lambda: "cloud-0" not in {n["name"] for n in c.nodes() if n["status"] != "dead"}, 30)
    assert _netns() == before

    # 3. nodes: 1..2 keeps one instance, idle or not.
    f.write_text(FLEET.format(nodes="1..2", extra=""))
    r = agent.cli("apply", "-f", str(f), "-y", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: [i["state"] for i in _fleet(agent)["instances"]] == ["idle"], timeout=180)
    import time

    time.sleep(25)  # past idle_duration: still there
    assert [i["state"] for i in _fleet(agent)["instances"]] == ["idle"]

    # 4. Deleting the fleet releases it.
    r = agent.cli("fleet", "delete", "cloud", "-y", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: _netns() == before, timeout=90)
