"""``meshgpu offer``, ``--blocks``, ``meshgpu metrics`` and ``/metrics`` through real agent
processes with fake GPUs, driven by the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshgpu.testing import AgentProcess
from tests.agent.conftest import loopback_agent, running, start_mesh, stop_all, wait_for


@pytest.fixture
def blocks_agent(tmp_path: Path) -> Iterator[AgentProcess]:
    yield from running(loopback_agent(tmp_path, "agent", "8xH100:80GB", extra=["--blocks", "2"]))


def _json(r: subprocess.CompletedProcess[str]) -> dict:
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_blocks_offers_and_metrics_on_one_host(blocks_agent: AgentProcess, tmp_path: Path) -> None:
    a = blocks_agent
    [node] = _json(a.cli("nodes", "--json"))
    # dstack: blocks must divide the CPUs too; on the usual even CPU count --blocks 2 holds.
    assert node["cpu_count"] % 2 == 0, "this test needs an even CPU count"
    assert (node["blocks"], node["busy_blocks"]) == (2, 0)

    doc = _json(a.cli("offer", "--gpu", "1..", "--cpu", "1..", "--memory", "1GB..", "--json"))
    [req] = doc["requests"]
    [o] = req["offers"]
    assert doc["fits_now"] and o["availability"] == "idle"
    # A block is half the host: asking for at least one GPU gets the smallest share, 4 GPUs.
    assert (o["blocks"], o["free_blocks"], o["total_blocks"]) == (1, 2, 2)
    assert o["gpu_indices"] == [0, 1, 2, 3]

    gate = tmp_path / "gate"
    task = tmp_path / "task.yml"
    task.write_text(
        f"""
type: task
commands:
  - echo "gpus=$CUDA_VISIBLE_DEVICES"
  - while [ ! -e {gate} ]; do sleep 0.05; done
resources:
  gpu: 1..
  cpu: 1..
  memory: 1GB..
"""
    )
    for name in ("one", "two"):
        assert a.cli("submit", "-f", str(task), "--name", name).returncode == 0
    c = a.client()
    runs = wait_for(
        lambda: (
            (r := [c.run(n) for n in ("one", "two")])
            and all(x["status"] == "running" for x in r)
            and r
        )
    )
    g1, g2 = (set(r["jobs"][0]["gpus"]) for r in runs)
    assert len(g1) == len(g2) == 4 and not g1 & g2
    try:
        nodes_text = a.cli("nodes")
        assert nodes_text.returncode == 0 and "2/2 busy" in nodes_text.stdout
        # Both blocks are taken: the host is still an offer, busy, and the reason says so.
        full = a.cli("offer", "--gpu", "1..", "--cpu", "1..", "--memory", "1GB..")
        assert full.returncode == 0, full.stderr
        assert "busy" in full.stdout and "0/2 free" in full.stdout
        assert "it would wait: no host can take it now" in full.stdout

        m = _json(a.cli("metrics", "one", "--json"))
        [job] = m["jobs"]
        assert job["error"] is None and job["node"] == "test-node"
        assert sorted(g["index"] for g in job["gpus"]) == sorted(g1)
        assert all(g["utilization_pct"] > 50 for g in job["gpus"])  # fake GPUs held look busy
        assert job["processes"] >= 1 and job["memory_bytes"] > 0
        plain = a.cli("metrics", "one")
        assert plain.returncode == 0 and "running" in plain.stdout
        assert sum(line.count("gpu") for line in plain.stdout.splitlines()) >= 4

        page = c.prometheus()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(page)
            for s in f.samples
        }
        assert samples[("meshgpu_node_blocks_busy", (("node", "test-node"),))] == 2
        assert samples[("meshgpu_node_gpus_busy", (("node", "test-node"),))] == 8
        assert samples[("meshgpu_jobs", (("status", "running"),))] == 2
        cpu = [v for (n, lv), v in samples.items() if n == "meshgpu_job_cpu_seconds_total"]
        assert len(cpu) == 2
    finally:
        gate.touch()
    wait_for(lambda: all(c.run(n)["status"] == "done" for n in ("one", "two")))


def test_offer_for_a_file_and_bad_specs(agent: AgentProcess, tmp_path: Path) -> None:
    cfg = tmp_path / "prod.yml"
    cfg.write_text('type: task\nfleets: [prod]\ncommands: ["true"]\nresources:\n  gpu: H100:2\n')
    r = agent.cli("offer", "-f", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "no host can ever run it: test-node is not in fleet prod" in r.stdout
    doc = _json(agent.cli("offer", "-f", str(cfg), "--json"))
    assert doc["requests"][0]["offers"] == [] and doc["fits_now"] is False

    plain = agent.cli("offer", "--gpu", "H100:2")
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert lines[0].startswith("2xH100 (cpu=2.. mem=8GB.. disk=100GB.. gpu=H100:2)")
    assert lines[1].split()[:3] == ["#", "NODE", "GPUS"]
    assert lines[2].split()[:3] == ["1", "test-node", "8xH100:80GB"]
    assert "gpu 0,1" in lines[2] and "idle" in lines[2]
    assert lines[-1] == "fits now: 1 idle host"

    bad = agent.cli("offer", "--gpu", "H100:x:y")
    assert bad.returncode == 1
    assert "GPU spec 'H100:x:y' gives the name twice" in bad.stderr
    assert "gpu=H100:80GB:2" in bad.stderr


@pytest.mark.parametrize("value", ["0", "-2", "lots", "1.5"])
def test_agent_refuses_a_bad_blocks_value(value: str, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "meshgpu", "agent", "--data-dir", str(tmp_path), "--blocks", value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1
    assert "--blocks takes a positive whole number" in r.stderr and "or auto" in r.stderr
    assert not (tmp_path / "node.json").exists()  # refused before anything started


def test_metrics_of_a_job_on_another_host_are_proxied(tmp_path: Path) -> None:
    agents = start_mesh(tmp_path, {"a": "2xH100:80GB", "b": "2xA100:40GB"}, ["--tick-ms", "50"])
    a, _ = agents
    try:
        ca = a.client()
        wait_for(lambda: len(ca.nodes()) == 2)
        # Offers see the whole mesh from any node: only node-b has A100s.
        doc = _json(a.cli("offer", "--gpu", "A100", "--json"))
        assert [o["node"] for o in doc["requests"][0]["offers"]] == ["node-b"]

        gate = tmp_path / "gate"
        cfg = f"type: task\ncommands:\n  - while [ ! -e {gate} ]; do sleep 0.05; done\nresources:\n  gpu: A100:1\n"
        ca.submit(cfg, name="on-b")
        wait_for(lambda: ca.run("on-b")["status"] == "running")
        try:
            m = _json(a.cli("metrics", "on-b", "--json"))
            [job] = m["jobs"]
            assert job["node"] == "node-b" and job["error"] is None
            [gpu] = job["gpus"]
            assert gpu["name"] == "A100" and gpu["memory_mib"] == 40 * 1024
            assert gpu["utilization_pct"] > 50
            assert job["processes"] >= 1
        finally:
            gate.touch()
        wait_for(lambda: ca.run("on-b")["status"] == "done")
    finally:
        stop_all(agents)
