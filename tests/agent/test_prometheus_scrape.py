"""``/metrics`` against the real tools: ``promtool check metrics`` (Prometheus's own linter) on
a live agent's page, and a real ``prometheus`` server (Debian's package) scraping a 3-agent mesh
over TLS with the bearer token, queried with PromQL."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from meshgpu.testing import free_port
from tests.agent.conftest import start_mesh, stop_all, wait_for

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def _task(gate: Path, gpu: str) -> str:
    return (
        "type: task\ncommands:\n"
        f"  - echo started\n  - while [ ! -e {gate} ]; do sleep 0.05; done\n"
        f"resources:\n  gpu: {gpu}\n"
    )


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian: prometheus) is not installed")
def test_promtool_accepts_every_nodes_metrics_page(tmp_path: Path) -> None:
    agents = start_mesh(tmp_path, {"a": "2xH100:80GB", "b": "1xA100:40GB"}, ["--tick-ms", "50"])
    gate = tmp_path / "gate"
    try:
        ca = agents[0].client()
        wait_for(lambda: len(ca.nodes()) == 2)
        ca.submit(_task(gate, "H100:1"), name="linted")
        wait_for(lambda: ca.run("linted")["status"] == "running")
        for ag in agents:  # every node's page, the job's host and another
            page = ag.client().prometheus()
            assert "meshgpu_runs{" in page
            r = subprocess.run(
                [PROMTOOL, "check", "metrics"],
                input=page,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (
                ag.name,
                r.stdout,
                r.stderr,
            )
        job_host = next(
            a for a in agents if "meshgpu_job_cpu_seconds_total{" in a.client().prometheus()
        )
        assert job_host.name == "node-a"
    finally:
        gate.touch()
        stop_all(agents)


def _query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback
        doc = json.loads(r.read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus (Debian package) is not installed")
def test_a_real_prometheus_scrapes_three_agents_with_the_bearer_token(tmp_path: Path) -> None:
    agents = start_mesh(
        tmp_path,
        {"a": "2xH100:80GB", "b": "2xH100:80GB", "c": "1xA100:40GB"},
        ["--tick-ms", "50"],
    )
    gate = tmp_path / "gate"
    prom: subprocess.Popen[bytes] | None = None
    try:
        ca = agents[0].client()
        wait_for(lambda: len(ca.nodes()) == 3)
        ca.submit(_task(gate, "A100:1"), name="watched")
        wait_for(lambda: ca.run("watched")["status"] == "running")

        # The scrape configuration docs/metrics.md gives, pointed at these agents.
        token = tmp_path / "prom-token"
        token.write_text(agents[0].token)
        targets = [urllib.parse.urlsplit(a.url).netloc for a in agents]
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
            "scrape_configs": [
                {
                    "job_name": "meshgpu",
                    "scheme": "https",
                    "authorization": {"type": "Bearer", "credentials_file": str(token)},
                    "tls_config": {"ca_file": str(agents[0].ca_file)},
                    "static_configs": [{"targets": targets}],
                },
                {  # a wrong token: the target is down (401), not scraped anonymously
                    "job_name": "wrong-token",
                    "scheme": "https",
                    "authorization": {"type": "Bearer", "credentials": "not-the-token"},
                    "tls_config": {"ca_file": str(agents[0].ca_file)},
                    "static_configs": [{"targets": targets[:1]}],
                },
            ],
        }
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
        prom = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def ready() -> bool:
            try:
                return len(_query(port, 'up{job="meshgpu"} == 1')) == 3
            except OSError:
                assert prom is not None and prom.poll() is None, (
                    tmp_path / "prometheus.log"
                ).read_text()
                return False

        wait_for(ready, timeout=60, interval=0.5)
        up = _query(port, "up")
        by = {(s["metric"]["job"], s["metric"]["instance"]): s["value"][1] for s in up}
        assert {by[("meshgpu", t)] for t in targets} == {"1"}
        assert by[("wrong-token", targets[0])] == "0"

        # GPU utilization of the running job's GPU, joined through meshgpu_job_gpu.
        promql = (
            "meshgpu_gpu_utilization_ratio * on(node, gpu) group_left(run) "
            'meshgpu_job_gpu{run="watched"}'
        )
        [series] = wait_for(lambda: _query(port, promql), timeout=30, interval=0.5)
        assert series["metric"]["node"] == "node-c" and series["metric"]["gpu"] == "0"
        assert float(series["value"][1]) > 0.5  # fake GPUs held by a job look busy
        # The run counts, the same on every node: one per instance, each says one running.
        running = _query(port, 'meshgpu_runs{status="running"}')
        assert sorted(s["metric"]["instance"] for s in running) == sorted(targets)
        assert {s["value"][1] for s in running} == {"1"}
        [total] = _query(port, "max(sum by (instance) (meshgpu_runs))")
        assert total["value"][1] == "1"
        # Idle GPUs on the other hosts are scraped too: 5 GPUs in all.
        assert len(_query(port, "meshgpu_gpu_healthy == 1")) == 5
        # Every query of the Grafana dashboard in docs/ parses and evaluates on this server.
        dashboard = json.loads((ROOT / "docs/grafana/meshgpu-dashboard.json").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        assert len(exprs) >= 10
        for expr in exprs:
            _query(port, expr)
        assert _query(port, dashboard["panels"][0]["targets"][0]["expr"])[0]["value"][1] == "1"
    finally:
        gate.touch()
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(timeout=10)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
        stop_all(agents)
