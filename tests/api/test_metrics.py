"""``GET /metrics`` (Prometheus text) and ``GET /api/v1/runs/{name}/metrics`` for a job here."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from meshgpu.runner.usage import sample_groups
from tests.api._stub import StubAgent, api
from tests.scheduler._world import host, jobs, schedule, submit, task, world


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _one(samples: dict, name: str, **labels: str) -> float:
    [value] = [v for lv, v in samples[name] if all(lv.get(k) == x for k, x in labels.items())]
    return value


async def test_metrics_is_prometheus_text_with_node_raft_gpu_and_job_series(
    tmp_path: Path,
) -> None:
    sm = world(
        host("n1", 8, blocks=2),
        host("n2", 8),
        submit("train", task("H100:4"), at=1),
        submit("wait", task("H100:16"), at=2),
    )
    schedule(sm)
    agent = StubAgent(sm, tmp_path)
    [job] = jobs(sm, "train")
    agent.gpus.set_busy(set(job.gpu_indices))
    async with api(agent) as c:
        r = await c.get("/metrics")
        anonymous = await c.get("/metrics", headers={"Authorization": ""})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert anonymous.status_code == 401
    m = _samples(r.text)  # the official parser accepts the whole page
    assert _one(m, "meshgpu_info", node="n1")
    assert _one(m, "meshgpu_raft_term", node="n1") == 7
    assert _one(m, "meshgpu_raft_role", role="leader") == 1
    assert _one(m, "meshgpu_raft_role", role="follower") == 0
    assert _one(m, "meshgpu_raft_members", kind="voter") == 1
    assert _one(m, "meshgpu_runs", status="running") == 1
    assert _one(m, "meshgpu_runs", status="submitted") == 1
    assert _one(m, "meshgpu_jobs", status="running") == 1
    assert _one(m, "meshgpu_jobs_waiting") == 1
    assert _one(m, "meshgpu_nodes", status="active") == 2
    assert _one(m, "meshgpu_cluster_gpus") == 16
    assert _one(m, "meshgpu_cluster_gpus_busy") == 4
    assert _one(m, "meshgpu_node_gpus", node="n1") == 8
    assert _one(m, "meshgpu_node_gpus_busy", node="n1") == 4
    assert _one(m, "meshgpu_node_blocks", node="n1") == 2
    assert _one(m, "meshgpu_node_blocks_busy", node="n1") == 1
    busy = {lv["gpu"]: v for lv, v in m["meshgpu_gpu_busy"]}
    assert busy == {str(i): float(i in job.gpu_indices) for i in range(8)}
    util = {lv["gpu"]: v for lv, v in m["meshgpu_gpu_utilization_ratio"]}
    assert all(0.5 < util[str(i)] <= 1 for i in job.gpu_indices)
    assert all(util[g] < 0.05 for g in util if int(g) not in job.gpu_indices)
    assert _one(m, "meshgpu_gpu_memory_total_bytes", gpu="0") == 80 << 30
    assert len(m["meshgpu_gpu_ecc_errors_total"]) == 16
    held = sorted(int(lv["gpu"]) for lv, _ in m["meshgpu_job_gpu"] if lv["run"] == "train")
    assert held == sorted(job.gpu_indices)


async def test_run_metrics_sample_the_jobs_process_group_and_gpus(tmp_path: Path) -> None:
    sm = world(
        host("n1", 8),
        host("n2", 8),
        submit("train", task("H100:2"), at=1),
        submit("later", task("H100:16"), at=2),
    )
    schedule(sm)
    agent = StubAgent(sm, tmp_path)
    [job] = jobs(sm, "train")
    assert job.node_id == "n1"
    agent.gpus.set_busy(set(job.gpu_indices))
    proc = subprocess.Popen(
        ["sh", "-c", "sleep 60 & sleep 60 & wait"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        job_dir = agent.runner.job_dir(job.job_id)
        job_dir.mkdir(parents=True)
        (job_dir / "job.pid").write_text(json.dumps({"pid": proc.pid, "pgid": proc.pid}))
        with trio.fail_after(10):
            while sample_groups([proc.pid]).get(proc.pid, None) is None or (
                sample_groups([proc.pid])[proc.pid].processes < 3
            ):
                await trio.sleep(0.02)
        async with api(agent) as c:
            r = await c.get("/api/v1/runs/train/metrics")
            waiting = await c.get("/api/v1/runs/later/metrics", params={"job": 0})
            missing = await c.get("/api/v1/runs/nope/metrics")
            bad_job = await c.get("/api/v1/runs/train/metrics", params={"job": 3})
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["run"] == "train"
    [entry] = doc["jobs"]
    assert (entry["job_num"], entry["node"], entry["status"], entry["error"]) == (
        0,
        "n1",
        "running",
        None,
    )
    assert entry["processes"] == 3
    assert entry["memory_bytes"] > 100_000
    assert entry["cpu_pct"] is not None and entry["cpu_pct"] >= 0
    assert entry["cpu_seconds"] is not None and entry["sampled_at"] <= time.time()
    assert [g["index"] for g in entry["gpus"]] == job.gpu_indices
    for g in entry["gpus"]:
        assert g["name"] == "H100" and g["memory_mib"] == 80 * 1024
        assert g["utilization_pct"] > 50 and g["memory_used_mib"] > 0 and g["healthy"]
    later = waiting.json()["jobs"][0]
    assert later["error"] == "the job is not running yet" and later["gpus"] == []
    assert missing.status_code == 404 and "meshgpu ps -a" in missing.json()["detail"]
    assert bad_job.status_code == 404


async def test_local_only_requests_do_not_proxy(tmp_path: Path) -> None:
    sm = world(host("n1", 8), host("n2", 8), submit("a", task("H100:8")), submit("b", task("8")))
    schedule(sm)
    elsewhere = next(r for r in ("a", "b") if jobs(sm, r)[0].node_id == "n2")
    async with api(StubAgent(sm, tmp_path)) as c:
        doc = (await c.get(f"/api/v1/runs/{elsewhere}/metrics", params={"local": "true"})).json()
    assert doc["jobs"][0]["error"] == "this node (n1) does not run the job"
    assert doc["jobs"][0]["node"] == "n2"
