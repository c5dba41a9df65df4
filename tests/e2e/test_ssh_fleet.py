"""SSH fleets end to end: "bare hosts" are network namespaces running only OpenSSH's sshd
(tests/e2e/bare_hosts.py); a mesh of two agents in two other namespaces. Applying a 2-host SSH
fleet through a member (a follower) installs the agent file on both hosts over SSH and they join
with the fleet's label; a ``nodes: 2`` task with ``fleets: [that fleet]`` runs on them;
re-applying with an unreachable host and a host whose key is wrong adds only those, which fail
with a readable reason while the others stay active, and re-applying without them removes only
those; ``fleet delete`` leaves no meshgpu process
in the namespaces and no member in Raft."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgpu.testing import AgentProcess
from tests.e2e import bare_hosts
from tests.e2e.agents import ns_agent, wait_for
from tests.e2e.netns import Net, available

REASON = available() or bare_hosts.available()
if REASON and os.environ.get("CI") == "true":
    raise RuntimeError(f"under CI these tests must run: {REASON}")
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON or "ok")

FLEET = """\
type: fleet
name: gpus
placement: cluster
env:
  MESHGPU_FAKE_GPUS: 1xH100:80GB
  FLEET_MARK: hello-from-the-fleet
  FLEET_SECRET: {secret}
ssh_config:
  user: root
  identity_file: {key}
  hosts:
{hosts}
"""

TASK = """\
type: task
name: pair
nodes: 2
fleets: [gpus]
commands:
  - echo rank=$DSTACK_NODE_RANK of $DSTACK_NODES_NUM mark=$FLEET_MARK
resources:
  gpu: H100:1
  cpu: 1..
  memory: 0.1GB..
  disk: 1GB..
"""


SECRET = "sealed-env-value-7f3a9c"


def fleet_file(path: Path, key: Path, hosts: list[str]) -> Path:
    path.write_text(
        FLEET.format(key=key, secret=SECRET, hosts="\n".join(f"    - {h}" for h in hosts))
    )
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:  # type: ignore[type-arg]
    from meshgpu.fleets.pyz import build

    root = tmp_path_factory.mktemp("fleet")
    pyz = build(root / "dist" / "meshgpu.pyz")
    good = bare_hosts.keypair(root / "fleet_key")
    bad = bare_hosts.keypair(root / "other_key")
    net = Net.create(5)  # h1, h2: the mesh; h3, h4, h5: bare hosts
    agents: list[AgentProcess] = []
    bare: list[bare_hosts.BareHost] = []
    try:
        for i, h in enumerate(net.hosts[:2], start=1):
            agents.append(
                ns_agent(
                    h, root, f"m{i}", fake_gpus="1xA100:40GB", env={"MESHGPU_AGENT_PYZ": str(pyz)}
                )
            )
            agents[-1].start(agents[0].join_token() if i > 1 else None)
        wait_for(lambda: len(agents[0].client().nodes()) == 2, timeout=60)
        for i, h in enumerate(net.hosts[2:], start=3):
            bare.append(bare_hosts.BareHost(h, root / f"bare{i}").start([good]))
        yield {"net": net, "agents": agents, "bare": bare, "root": root, "good": good, "bad": bad}
    finally:
        for b in bare:
            b.stop()
        for a in agents:
            a.close()
        net.delete()


def _follower(agents: list[AgentProcess]) -> AgentProcess:
    st = agents[0].client().status()
    leader = st["leader"]
    return next(a for a in agents if a.client().status()["raft_id"] != leader)


def _fleet(agent: AgentProcess) -> dict:  # type: ignore[type-arg]
    return agent.client()._request("GET", "/api/v1/fleets/gpus").json()  # noqa: SLF001


def _states(agent: AgentProcess) -> dict[str, str]:
    return {h["hostname"]: h["state"] for h in _fleet(agent)["hosts"]}


def test_ssh_fleet_end_to_end(world: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    agents, bare = world["agents"], world["bare"]
    h3, h4, h5 = (b.host.ip for b in bare)
    member = _follower(agents)
    home = tmp_path / "home"
    home.mkdir()
    cli_env = {"HOME": str(home)}

    # 1. A 2-host fleet applied through a follower: both join with the fleet's labels.
    f = fleet_file(tmp_path / "fleet.yml", world["good"], [h3, h4])
    r = member.cli("apply", "-f", str(f), "-y", env=cli_env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _states(member) == {h3: "active", h4: "active"}, [
        (h["hostname"], h["reason"]) for h in _fleet(member)["hosts"]
    ]
    nodes = {n["name"]: n for n in member.client().nodes()}
    for name, inst in (("gpus-0", "0"), ("gpus-1", "1")):
        assert nodes[name]["labels"]["fleet"] == "gpus", nodes[name]
        assert nodes[name]["labels"]["instance"] == inst
    roles = {n["name"]: n["role"] for n in nodes.values()}
    assert {roles["gpus-0"], roles["gpus-1"]} <= {"learner", "voter"}
    # the key and the env values are sealed: no plaintext of them in any member's Raft log or
    # snapshot (the members', and the fleet hosts' own replicas)
    key_line = world["good"].read_text().splitlines()[1]
    data_dirs = [a.data for a in agents] + [b.install_dir / "gpus" / "data" for b in bare[:2]]
    for d in data_dirs:
        assert d.is_dir(), d
        for p in d.rglob("*"):
            if p.is_file() and p.stat().st_size < 64 << 20:
                body = p.read_bytes()
                assert key_line.encode() not in body, p
                assert SECRET.encode() not in body, p
    r = member.cli("nodes", env=cli_env)
    rows = [line for line in r.stdout.splitlines() if line.startswith("gpus-")]
    assert len(rows) == 2 and all("fleet=gpus" in x for x in rows), r.stdout
    r = member.cli("fleet", "ls", env=cli_env)
    assert r.returncode == 0 and "gpus" in r.stdout and "2 active" in r.stdout, r.stdout
    for b in bare[:2]:
        assert any("meshgpu.pyz" in c for c in b.processes()), b.processes()
        # each fleet has its own directory under the install dir
        assert (b.install_dir / "gpus" / "meshgpu.pyz").is_file()

    # 2. A nodes: 2 task for the fleet runs on its two hosts (not on the members).
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "task.yml").write_text(TASK)
    r = member.cli("apply", "-f", "task.yml", "-y", "-d", cwd=proj, env=cli_env)
    assert r.returncode == 0, r.stdout + r.stderr
    c = member.client()
    run = wait_for(lambda: (x := c.run("pair")) and x["status"] == "done" and x, timeout=120)
    assert sorted(j["node"] for j in run["jobs"]) == ["gpus-0", "gpus-1"], run
    out = b"".join(c.logs("pair", job=0)).decode()
    assert "mark=hello-from-the-fleet" in out, out  # the fleet's env reaches its jobs (unsealed)

    # 3. Re-apply with an unreachable host and a host that refuses the key: only those are
    # bootstrapped (and fail, with a reason), the others stay active.
    unreachable = h5.rsplit(".", 1)[0] + ".77"
    f.write_text(
        FLEET.format(
            key=world["good"],
            secret=SECRET,
            hosts="\n".join(
                [
                    f"    - {h3}",
                    f"    - {h4}",
                    f"    - {unreachable}",
                    f"    - hostname: {h5}",
                    f"      identity_file: {world['bad']}",
                ]
            ),
        )
    )
    before = {h["hostname"]: h["updated_at"] for h in _fleet(member)["hosts"]}
    r = member.cli("apply", "-f", str(f), "-y", env=cli_env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = {h["hostname"]: h for h in _fleet(member)["hosts"]}
    assert doc[h3]["state"] == doc[h4]["state"] == "active"
    assert doc[h3]["updated_at"] == before[h3] and doc[h4]["updated_at"] == before[h4]
    assert doc[unreachable]["state"] == "failed", doc[unreachable]
    assert "cannot reach" in doc[unreachable]["reason"], doc[unreachable]
    assert doc[h5]["state"] == "failed", doc[h5]
    assert "permission denied" in doc[h5]["reason"], doc[h5]
    r = member.cli("fleet", "get", "gpus", env=cli_env)
    assert "permission denied" in r.stdout and "cannot reach" in r.stdout, r.stdout

    # 3b. Re-apply without the failed hosts: they go (never reached: nothing to clean up on
    # them), the active ones are untouched.
    f.write_text(FLEET.format(key=world["good"], secret=SECRET, hosts=f"    - {h3}\n    - {h4}"))
    r = member.cli("apply", "-f", str(f), "-y", "-d", env=cli_env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: set(_states(member)) == {h3, h4}, timeout=60)
    doc = {h["hostname"]: h for h in _fleet(member)["hosts"]}
    assert doc[h3]["updated_at"] == before[h3] and doc[h4]["updated_at"] == before[h4]

    # 4. Delete one host while a run holds it (drained: the run gets the graceful stop), then
    # the fleet: no meshgpu process left, no member in Raft.
    long = TASK.replace("name: pair", "name: long").replace(
        "echo rank=$DSTACK_NODE_RANK of $DSTACK_NODES_NUM mark=$FLEET_MARK", "sleep 600"
    )
    (proj / "long.yml").write_text(long)
    r = member.cli("apply", "-f", "long.yml", "-y", "-d", cwd=proj, env=cli_env)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: c.run("long")["status"] == "running", timeout=120)
    r = member.cli("fleet", "delete", "gpus", "--host", h4, "-y", env=cli_env)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: h4 not in _states(member), timeout=120)
    assert c.run("long")["status"] in ("terminated", "failed", "done"), c.run("long")
    assert not any("meshgpu" in c for c in bare[1].processes()), bare[1].processes()
    assert not bare[1].install_dir.exists()
    # the deleted host left the node list (its member and its record); the other stays
    names = [n["name"] for n in c.nodes()]
    assert "gpus-1" not in names and "gpus-0" in names, names
    r = member.cli("fleet", "delete", "gpus", "-y", env=cli_env)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: member.client()._request("GET", "/api/v1/fleets").json() == [], timeout=90)  # noqa: SLF001
    for b in bare:
        assert not any("meshgpu" in c for c in b.processes()), b.processes()
        assert not b.install_dir.exists()
    st = member.client().status()
    assert len(st["voters"]) + len(st["learners"]) == 2, st
    names = [n["name"] for n in member.client().nodes()]
    assert not [n for n in names if n.startswith("gpus-")], names
    r = member.cli("nodes", env=cli_env)
    assert "gpus-" not in r.stdout, r.stdout
