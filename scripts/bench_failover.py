"""scripts/bench failover: a 3-agent mesh on loopback (separate processes, fake GPUs, default
timing: 100 ms ticks, election timeout 10 ticks). Five times: SIGKILL the leader, then measure
the time until a submission through a survivor is accepted and until a job from it runs; the
killed agent is restarted (same data dir: it rejoins as itself) between repetitions.

The last line is JSON with the keys in INTERFACE.md.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from meshgpu.testing import AgentProcess


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    agents = [AgentProcess(root, f"n{i}") for i in range(3)]
    agents[0].start()
    token = agents[0].join_token()
    for a in agents[1:]:
        a.start(token, agents[0].url)
    headers = {"Authorization": f"Bearer {agents[0].token}"}
    c = httpx.Client(timeout=5, headers=headers, verify=agents[0].verify)
    try:
        deadline = time.monotonic() + 60
        while len(c.get(f"{agents[0].url}/api/v1/status").json()["voters"]) < 3:
            if time.monotonic() > deadline:
                raise SystemExit("voters were not promoted")
            time.sleep(0.2)
        accept, run = [], []
        for rep in range(5):
            status = None
            for a in agents:
                try:
                    status = c.get(f"{a.url}/api/v1/status").json()
                    break
                except httpx.HTTPError:
                    continue
            assert status is not None
            leader = next(
                a
                for a in agents
                if c.get(f"{a.url}/api/v1/status").json()["raft_id"] == status["leader"]
            )
            survivor = next(a for a in agents if a is not leader)
            rid = uuid.uuid4().hex
            body = {"config": "type: task\ncommands: ['date +%s.%N']\n", "request_id": rid}
            t0 = time.time()
            leader.kill()
            while True:
                try:
                    r = c.post(f"{survivor.url}/api/v1/runs", json=body, timeout=3)
                    if r.status_code == 201:
                        break
                except httpx.HTTPError:
                    pass
            t_accept = time.time()
            name = r.json()["name"]
            while True:
                doc = c.get(f"{survivor.url}/api/v1/runs/{name}").json()
                if doc["status"] in ("done", "failed"):
                    break
                time.sleep(0.02)
            text = c.get(f"{survivor.url}/api/v1/runs/{name}/logs").text
            t_run = float(text.split()[0]) if text.strip() else float("nan")
            accept.append(t_accept - t0)
            run.append(t_run - t0)
            print(
                f"rep {rep + 1}: accepted after {accept[-1] * 1000:.0f} ms, job ran after {run[-1] * 1000:.0f} ms "
                f"({doc['status']} on {doc['jobs'][0]['node']})"
            )
            leader.start()  # rejoins as itself
        out = {
            "failover_accept_p50_ms": round(statistics.median(accept) * 1000, 1),
            "failover_accept_max_ms": round(max(accept) * 1000, 1),
            "failover_run_p50_ms": round(statistics.median(run) * 1000, 1),
        }
        print(json.dumps(out))
    finally:
        c.close()
        for a in agents:
            a.stop()
            a.kill_jobs()


if __name__ == "__main__":
    main()
