"""Node-to-node traffic on the mutual-TLS peer port, between real agents on loopback: a job on
another host fetches its code from the accepting member, its logs and metrics are proxied by
the member asked, and a follower forwards a join to the leader -- none of it with a token."""

from __future__ import annotations

from pathlib import Path

from meshgpu.client import make_archive
from meshgpu.testing import AgentProcess
from tests.agent.conftest import stop_all, wait_for


def _start(
    root: Path, name: str, gpus: str, join: tuple[AgentProcess, AgentProcess] | None, *extra: str
) -> AgentProcess:
    """Agent ``node-<name>``; ``join``: (the founder, whose token it uses; the member it joins
    through)."""
    ag = AgentProcess(
        root,
        name,
        node_name=f"node-{name}",
        fake_gpus=gpus,
        log_level=None,  # info: the fetch is logged
        extra=["--tick-ms", "50", *extra],
    )
    if join is None:
        return ag.start()
    founder, via = join
    return ag.start(founder.join_token(), via.url)


def test_code_logs_metrics_and_joins_go_over_the_peer_port(tmp_path: Path) -> None:
    agents: list[AgentProcess] = []
    try:
        # No copies: the only way for b to get the code is to fetch it from a.
        a = _start(tmp_path, "a", "1xH100:80GB", None, "--code-copies", "0")
        agents.append(a)
        b = _start(tmp_path, "b", "1xA100:80GB", (a, a))
        agents.append(b)
        ca, cb = a.client(), b.client()
        wait_for(lambda: cb.status()["leader"] == ca.status()["raft_id"] != cb.status()["raft_id"])
        # b is a follower: c's join goes to b, which forwards it to the leader.
        c = _start(tmp_path, "c", "1xL4:24GB", (a, b))
        agents.append(c)
        nodes = wait_for(lambda: (ns := ca.nodes()) and len(ns) == 3 and ns)
        assert {n["name"] for n in nodes} == {"node-a", "node-b", "node-c"}

        project = tmp_path / "project"
        project.mkdir()
        (project / "data.txt").write_text("payload-from-the-laptop\n")
        data, sha = make_archive(project)
        assert ca.upload_code(data, sha)["copies"] == []
        gate = tmp_path / "gate"
        task = (
            "type: task\ncommands:\n  - cat data.txt\n"
            f"  - while [ ! -e {gate} ]; do sleep 0.05; done\nresources:\n  gpu: A100:1\n"
        )
        ca.submit(task, name="remote", code_sha256=sha)
        run = wait_for(lambda: (r := ca.run("remote")) and r["status"] == "running" and r, 60)
        assert run["jobs"][0]["node"] == "node-b"
        b_log = (tmp_path / "b.log").read_text()
        assert f"code={sha[:12]} fetched from node-a" in b_log
        assert (b.data / "code" / f"{sha}.tar.gz").read_bytes() == data
        # The log lives on b; a streams it through the peer port.
        assert b"payload-from-the-laptop" in wait_for(
            lambda: (out := b"".join(ca.logs("remote"))) and b"payload" in out and out
        )
        # So do the job's metrics: a asks b for its own sample.
        [entry] = ca.run_metrics("remote")["jobs"]
        assert entry["node"] == "node-b" and entry["error"] is None, entry
        assert entry["processes"] and entry["processes"] >= 1
        gate.touch()
        wait_for(lambda: ca.run("remote")["status"] == "done", 30)
        assert b"payload-from-the-laptop" in b"".join(ca.logs("remote", follow=True))
    finally:
        stop_all(agents)
