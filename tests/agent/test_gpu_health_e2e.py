"""GPU health end to end on real agents with fake GPUs: an XID 79 injected through the fake
GPU state file takes the GPU out of scheduling, shows its reason in ``meshgpu nodes
[--unhealthy]``, the API and ``/metrics``, and the GPU comes back only after
``--gpu-healthy-checks`` healthy checks."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.agent.conftest import start_mesh, stop_all, wait_for

FAST_GOSSIP = ["--gossip", "local,probe_interval=0.5,probe_timeout=0.2,gossip_interval=0.05"]


def test_xid_79_keeps_work_off_the_gpu_until_it_has_been_healthy_a_while(
    tmp_path: Path,
) -> None:
    extra = ["--tick-ms", "50", "--gpu-healthy-checks", "2", *FAST_GOSSIP]
    agents = start_mesh(tmp_path, {"a": "1xA100:40GB", "b": "2xH100:80GB"}, extra)
    try:
        a, b = agents
        ca = a.client()
        wait_for(lambda: len(ca.nodes()) == 2)
        healthy = a.cli("nodes", "--unhealthy")
        assert healthy.returncode == 0 and "every GPU is healthy" in healthy.stdout

        def b_gpus() -> list[dict]:
            return next(n for n in ca.nodes() if n["name"] == "node-b")["gpus"]

        # XID 79 (fallen off the bus) on node-b's GPU 0; node-a (the leader) acts on gossip.
        t0 = time.monotonic()
        (b.data / "fake-gpu-state.json").write_text(json.dumps({"0": {"xid": 79}}))
        wait_for(lambda: not b_gpus()[0]["healthy"], timeout=20, interval=0.02)
        print(f"XID 79 to a replicated verdict: {time.monotonic() - t0:.2f}s")
        assert b_gpus()[0]["health_reason"] == "XID 79" and b_gpus()[1]["healthy"]

        # The reason everywhere: nodes --unhealthy (only that GPU), the API, /metrics.
        r = a.cli("nodes", "--unhealthy")
        assert r.returncode == 0, r.stderr
        assert "node-b gpu0: H100 80GB" in r.stdout and "UNHEALTHY: XID 79" in r.stdout
        assert "gpu1" not in r.stdout and "node-a" not in r.stdout
        [doc] = json.loads(a.cli("nodes", "--unhealthy", "--json").stdout)
        assert [g["index"] for g in doc["gpus"]] == [0]
        page = b.client().prometheus()
        assert 'meshgpu_gpu_healthy{gpu="0"' in page and "meshgpu_node_gpus_unhealthy" in page
        assert 'meshgpu_node_gpus_unhealthy{node="node-b"} 1.0' in page

        # No new work on it: a 2-H100 task waits, a 1-H100 task gets the healthy GPU 1.
        gate = tmp_path / "gate"
        wait_cmd = f"while [ ! -e {gate} ]; do sleep 0.05; done"
        ca.submit(f"type: task\ncommands: ['{wait_cmd}']\nresources:\n  gpu: H100:2\n", name="two")
        ca.submit("type: task\ncommands: ['true']\nresources:\n  gpu: H100:1\n", name="one")
        one = wait_for(lambda: (r := ca.run("one"))["status"] == "done" and r)
        assert one["jobs"][0]["gpus"] == [1]
        assert ca.run("two")["jobs"][0]["status"] == "submitted"
        assert ca.run("two")["jobs"][0]["why_pending"]

        # The fault clears: it is "recovering" for a check, then healthy; the 2-GPU task runs.
        (b.data / "fake-gpu-state.json").write_text("{}")
        seen: set[str] = set()

        def back() -> bool:
            g = b_gpus()[0]
            seen.add(g["health_reason"])
            return g["healthy"]

        wait_for(back, timeout=30, interval=0.02)
        assert "recovering (1/2 healthy checks) after: XID 79" in seen
        two = wait_for(lambda: (j := ca.run("two")["jobs"][0])["status"] == "running" and j)
        assert two["node"] == "node-b" and sorted(two["gpus"]) == [0, 1]
        gate.touch()
    finally:
        stop_all(agents)


def test_agent_refuses_a_bad_healthy_check_count(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshgpu",
            "agent",
            "--data-dir",
            str(tmp_path),
            "--gpu-healthy-checks",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1
    assert "--gpu-healthy-checks must be 1..10000, not 0" in r.stderr
