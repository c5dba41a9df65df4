"""``meshgpu metrics RUN --since``: the job's host keeps the samples, any node reads them (peer
call to the host), through the CLI and the API."""

from __future__ import annotations

import json
from pathlib import Path

from tests.agent.conftest import start_mesh, stop_all, wait_for


def test_history_of_a_job_on_another_host_through_any_node(tmp_path: Path) -> None:
    extra = ["--tick-ms", "50", "--history-interval-ms", "200"]
    agents = start_mesh(tmp_path, {"a": "1xA100:40GB", "b": "2xH100:80GB"}, extra)
    gate = tmp_path / "gate"
    try:
        a, _ = agents
        ca = a.client()
        wait_for(lambda: len(ca.nodes()) == 2)
        # A job that burns some CPU on node-b's two H100s, asked about through node-a.
        ca.submit(
            "type: task\ncommands:\n"
            f"  - while [ ! -e {gate} ]; do i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; done\n"
            "resources:\n  gpu: H100:2\n",
            name="hist",
        )
        wait_for(lambda: ca.run("hist")["status"] == "running")

        def enough() -> dict | None:
            doc = ca.run_history("hist", 3600)
            [j] = doc["jobs"]
            return doc if len([v for v in j["cpu_pct"] if v is not None]) >= 5 else None

        doc = wait_for(enough, timeout=30, interval=0.2)
        [j] = doc["jobs"]
        assert j["node"] == "node-b" and j["error"] is None
        assert len(j["t"]) == len(j["cpu_pct"]) == len(j["memory_bytes"]) >= 6
        assert j["t"] == sorted(j["t"]) and doc["since"] < j["t"][0] <= doc["until"]
        assert max(v for v in j["cpu_pct"] if v is not None) > 5  # the shell loop burns CPU
        assert all(m > 0 for m in j["memory_bytes"])
        assert [g["index"] for g in j["gpus"]] == [0, 1]
        for g in j["gpus"]:  # fake GPUs held by a job look busy
            assert g["t"] and all(u > 50 for u in g["utilization_pct"])

        # The CLI: --json is the API's answer; plain text has a line chart per series.
        r = a.cli("metrics", "hist", "--since", "1h", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["jobs"][0]["node"] == "node-b"
        text = a.cli("metrics", "hist", "--since", "10m")
        assert text.returncode == 0, text.stderr
        assert "job 0 on node-b (running)" in text.stdout
        assert "gpu0" in text.stdout and "gpu1 mem" in text.stdout and "avg " in text.stdout
        assert any(c in text.stdout for c in "▅▆▇█")
        # A bounded answer: points averages the samples down.
        few = ca.run_history("hist", 3600, points=2)["jobs"][0]
        assert 1 <= len(few["t"]) <= 2

        # Bad input: a clear error that says what to write.
        bad = a.cli("metrics", "hist", "--since", "yesterday")
        assert bad.returncode == 1 and "--since" in bad.stderr and "1h" in bad.stderr
        far = a.cli("metrics", "hist", "--since", "30d")
        assert far.returncode == 1 and "at most 7d" in far.stderr
        both = a.cli("metrics", "hist", "--since", "1h", "-w")
        assert both.returncode == 1 and "do not go together" in both.stderr
        missing = a.cli("metrics", "nope", "--since", "1h")
        assert missing.returncode == 1 and "nope" in missing.stderr
    finally:
        gate.touch()
        stop_all(agents)
