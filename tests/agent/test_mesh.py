"""A mesh of real agent processes on loopback: join with a token, any node accepts work, jobs
land on whichever host has the GPUs, logs are proxied, losing the leader loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meshgpu.client import APIError
from meshgpu.client.http import write_profile
from meshgpu.security import JoinToken
from meshgpu.testing import AgentProcess
from tests.agent.conftest import loopback_agent, start_mesh, stop_all, wait_for

# Gossip timing for tests: memberlist's local profile, faster probes (suspicion 1.5-9 s).
FAST_GOSSIP = ["--gossip", "local,probe_interval=0.5,probe_timeout=0.2,gossip_interval=0.05"]


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    agents = start_mesh(tmp_path, dict.fromkeys("abc", "2xH100:80GB"), ["--tick-ms", "50"])
    try:
        yield agents
    finally:
        stop_all(agents)


def test_join_promote_place_across_hosts_and_survive_the_leader(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    a, b, c = mesh
    ca, cb, cc = a.client(), b.client(), c.client()
    nodes = wait_for(lambda: (ns := ca.nodes()) and len(ns) == 3 and ns)
    assert {n["name"] for n in nodes} == {"node-a", "node-b", "node-c"}
    # The two joiners are promoted once caught up: three voters.
    st = wait_for(lambda: (s := cb.status()) and len(s["voters"]) == 3 and s, timeout=30)
    assert st["cluster_id"] == ca.status()["cluster_id"]
    # Any node accepts work; 2-GPU tasks land on three different hosts.
    gate = tmp_path / "gate"
    cfg = f"type: task\ncommands:\n  - echo on $(hostname) rank $DSTACK_NODE_RANK\n  - while [ ! -e {gate} ]; do sleep 0.05; done\nresources:\n  gpu: 2\n"
    for cl, name in ((ca, "via-a"), (cb, "via-b"), (cc, "via-c")):
        cl.submit(cfg, name=name)
    runs = wait_for(
        lambda: (
            (r := [cc.run(n) for n in ("via-a", "via-b", "via-c")])
            and all(x["status"] == "running" for x in r)
            and r
        ),
        timeout=30,
    )
    assert len({r["jobs"][0]["node"] for r in runs}) == 3
    # Logs of a job on another host are proxied by the node asked.
    for r in runs:
        assert b"rank 0" in b"".join(ca.logs(r["name"]))
    gate.touch()
    wait_for(
        lambda: all(cb.run(n)["status"] == "done" for n in ("via-a", "via-b", "via-c")), timeout=30
    )

    # Kill the leader: the survivors elect one and keep accepting work.
    leader_raft = ca.status()["leader"]
    victim = next(ag for ag in mesh if ag.client().status()["raft_id"] == leader_raft)
    survivors = [ag for ag in mesh if ag is not victim]
    # A CLI whose profile names the leader learns the other members from its answers ...
    profile = tmp_path / "client.toml"
    write_profile(profile, victim.url, victim.token, ca=victim.ca_file.read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHGPU_")}
    env["MESHGPU_CONFIG"] = str(profile)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshgpu", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=work,
            timeout=60,
            check=False,
        )

    work = tmp_path / "work"
    work.mkdir()
    (work / "task.yml").write_text("type: task\ncommands: [echo via-cli]\n")
    assert cli("status", "--json").returncode == 0
    assert all(ag.url in profile.read_text() for ag in survivors)
    t = time.monotonic()
    victim.kill()
    sc = survivors[0].client()

    def accepted() -> bool:
        try:  # one request id for every retry: a retry after a lost answer is not a new run
            sc.submit(
                "type: task\ncommands: [echo after-failover]\n",
                name="after",
                request_id="after-failover-1",
            )
            return True
        except APIError:
            return False

    wait_for(accepted, timeout=30)
    took = time.monotonic() - t
    run = wait_for(lambda: (r := sc.run("after")) and r["status"] == "done" and r, timeout=30)
    assert run["jobs"][0]["node"] != victim.name
    assert took < 15
    # ... and goes to them when the node it names is dead: submit and ps still work.
    r = cli("submit", "-f", "task.yml", "--name", "via-cli")
    assert r.returncode == 0, r.stdout + r.stderr
    run = wait_for(lambda: (x := sc.run("via-cli")) and x["status"] == "done" and x, timeout=30)
    r = cli("ps", "-a", "--json")
    assert r.returncode == 0 and "via-cli" in r.stdout, r.stdout + r.stderr


def test_a_host_without_a_valid_token_is_refused(mesh: list[AgentProcess], tmp_path: Path) -> None:
    a = mesh[0]
    token = a.join_token()
    parts = token.split(".")
    forged = ".".join([*parts[:4], JoinToken.create("x", "y").secret])  # well-formed, wrong
    intruder = loopback_agent(tmp_path, "intruder", "1xH100:80GB", node_name="intruder")
    with pytest.raises(RuntimeError, match="refused"):
        intruder.start(forged, a.url)
    assert intruder.proc is not None and intruder.proc.returncode == 1
    assert "Traceback" not in intruder.log_tail(100_000)
    # A revoked token stops working too.
    ca = a.client()
    doc = ca._request("POST", "/api/v1/tokens").json()  # noqa: SLF001
    ca._request("DELETE", f"/api/v1/tokens/{doc['token_id']}")  # noqa: SLF001
    late = loopback_agent(tmp_path, "late", "1xH100:80GB", node_name="late")
    with pytest.raises(RuntimeError, match="revoked"):
        late.start(doc["token"], a.url)
    assert late.proc is not None and late.proc.returncode == 1
    # And the peer port refuses a client without a cluster certificate.
    assert httpx.get(f"{a.url}/healthz", verify=a.verify).status_code == 200


def test_a_dead_host_is_declared_and_its_job_is_fenced_when_it_returns(tmp_path: Path) -> None:
    import signal as sig

    fast = ["--tick-ms", "50", "--dead-grace", "3s", *FAST_GOSSIP]
    agents = start_mesh(tmp_path, {"a": "1xH100:80GB", "b": "2xH100:80GB"}, fast)
    a, b = agents
    try:
        ca = a.client()
        wait_for(lambda: len(ca.nodes()) == 2)
        # Only node-b has 2 GPUs: the job must land there.
        ca.submit(
            "type: task\ncommands: ['echo $$ > pid; sleep 600']\nresources:\n  gpu: 2\n",
            name="victim",
        )
        run = wait_for(lambda: (r := ca.run("victim")) and r["status"] == "running" and r)
        assert run["jobs"][0]["node"] == "node-b"
        job_id = run["jobs"][0]["job_id"]
        pidfile = b.work_dir(job_id) / "pid"
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip())
        # The job's own ``$$`` is a pid of its PID namespace; on the host, its process tree is
        # the one its supervisor recorded (the namespace's init, or the job itself without one).
        record = b.data / "jobs" / job_id / "job.pid"
        pid = int(json.loads(record.read_text())["pid"])
        assert b.proc is not None
        b.proc.send_signal(sig.SIGSTOP)  # the host hangs (or is cut off)
        run = wait_for(
            lambda: (r := ca.run("victim")) and r["status"] == "failed" and r, timeout=30
        )
        assert run["jobs"][0]["termination_reason"] == "instance_unreachable"
        assert next(n for n in ca.nodes() if n["name"] == "node-b")["status"] == "dead"
        b.proc.send_signal(sig.SIGCONT)

        # Back, it learns its job was failed over and stops it: never two copies.
        def gone() -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
            except OSError:
                return True

        wait_for(gone, timeout=30)
        # And it registers again as a live host.
        wait_for(
            lambda: next(n for n in ca.nodes() if n["name"] == "node-b")["status"] == "active",
            timeout=30,
        )
    finally:
        stop_all(agents)


def test_gossip_sees_a_death_and_a_gpu_fault_keeps_work_off_the_gpu(tmp_path: Path) -> None:
    fast = ["--tick-ms", "50", "--dead-grace", "3s", *FAST_GOSSIP]
    specs = {"a": "1xH100:80GB", "b": "2xH100:80GB", "c": "1xH100:80GB"}
    agents = start_mesh(tmp_path, specs, fast)
    try:
        a, b, c = agents
        ca, cc = a.client(), c.client()

        def gossip_states(client: object) -> dict[str, str | None]:
            return {
                n["name"]: (n["gossip"] or {}).get("state")
                for n in client.nodes()  # type: ignore[attr-defined]
            }

        # Every node's gossip view has every host alive, with live telemetry of its peers.
        everyone = {"node-a": "alive", "node-b": "alive", "node-c": "alive"}
        wait_for(lambda: gossip_states(ca) == everyone and gossip_states(cc) == everyone)
        peer_b = next(n for n in ca.nodes() if n["name"] == "node-b")
        assert [t["index"] for t in peer_b["telemetry"]] == [0, 1]

        # An XID on node-b's GPU 1 (the fake GPU's NVML-like fault knob): the leader turns
        # the gossiped fault into a replicated verdict, seen on every node.
        (b.data / "fake-gpu-state.json").write_text(json.dumps({"1": {"xid": 79}}))

        def b_gpus(client: object) -> list[dict]:
            nodes = client.nodes()  # type: ignore[attr-defined]
            return next(n for n in nodes if n["name"] == "node-b")["gpus"]

        wait_for(lambda: not b_gpus(cc)[1]["healthy"])
        assert b_gpus(cc)[1]["health_reason"] == "XID 79" and b_gpus(cc)[0]["healthy"]
        # Only node-b has two GPUs, one of them faulty now: a 2-GPU task waits ...
        gate = tmp_path / "gate"
        cc.submit(
            f"type: task\ncommands: ['while [ ! -e {gate} ]; do sleep 0.05; done']\n"
            "resources:\n  gpu: 2\n",
            name="two",
        )
        job = wait_for(lambda: (j := cc.run("two")["jobs"][0])["why_pending"] and j)
        assert job["status"] == "submitted"
        # ... until the GPU recovers; then it runs there on both GPUs.
        (b.data / "fake-gpu-state.json").write_text("{}")
        job = wait_for(lambda: (j := cc.run("two")["jobs"][0])["status"] == "running" and j)
        assert job["node"] == "node-b" and sorted(job["gpus"]) == [0, 1]
        assert b_gpus(ca)[1]["healthy"]
        gate.touch()

        # node-c dies (SIGKILL: no goodbye): gossip declares it dead everywhere, and the leader
        # marks the host dead once Raft has been silent for the grace period too.
        c.kill()
        cb = b.client()
        wait_for(lambda: gossip_states(ca)["node-c"] == "dead", timeout=30)
        wait_for(lambda: gossip_states(cb)["node-c"] == "dead", timeout=30)
        wait_for(
            lambda: next(n for n in ca.nodes() if n["name"] == "node-c")["status"] == "dead",
            timeout=30,
        )
        assert gossip_states(ca)["node-a"] == gossip_states(ca)["node-b"] == "alive"
    finally:
        stop_all(agents)
