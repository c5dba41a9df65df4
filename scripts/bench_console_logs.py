"""scripts/bench console-logs: the latency the console's SSE log tail adds over ``meshgpu logs
-f`` (issue target: <= 100 ms). One agent (fake GPUs) runs a job that prints its wall clock
every 50 ms; two readers follow the log at once on the same node, one through the API's
``/api/v1/runs/{name}/logs?follow=true`` (what ``meshgpu logs -f`` reads) and one through the
console's ``/ui/runs/{name}/events`` (signed in with the cookie). Each line's latency is its
arrival time minus the time the job wrote into it.

The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshgpu.testing import AgentProcess  # noqa: E402

JOB = """type: task
commands:
  - i=0; while [ $i -lt {lines} ]; do i=$((i+1)); echo "t=$(date +%s.%N)"; sleep 0.05; done
resources:
  gpu: 1
"""


def follow(c: httpx.Client, path: str, sse: bool, out: list[float], lines: int) -> None:
    with c.stream("GET", path, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            now = time.time()
            text = line.removeprefix("data: ") if sse else line
            if text.startswith("t="):
                out.append(now - float(text[2:]))
                if len(out) >= lines:
                    return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=100)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        agent = AgentProcess(Path(tmp), "a", fake_gpus="1xH100:80GB").start()
        try:
            api = httpx.Client(
                base_url=agent.url,
                verify=agent.verify,
                headers={"Authorization": f"Bearer {agent.token}"},
            )
            ui = httpx.Client(base_url=agent.url, verify=agent.verify)
            r = ui.post("/ui/login", json={"token": agent.token}, headers={"X-Meshgpu-CSRF": "1"})
            assert r.status_code == 204, r.text
            agent.client().submit(JOB.format(lines=a.lines + 5), name="tick")
            deadline = time.monotonic() + 60
            while agent.client().run("tick")["status"] != "running":
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.05)
            logs: list[float] = []
            sse: list[float] = []
            readers = [
                threading.Thread(
                    target=follow,
                    args=(api, "/api/v1/runs/tick/logs?follow=true", False, logs, a.lines),
                ),
                threading.Thread(
                    target=follow, args=(ui, "/ui/runs/tick/events", True, sse, a.lines)
                ),
            ]
            for t in readers:
                t.start()
            for t in readers:
                t.join(timeout=120)
        finally:
            agent.close()
    # The first lines were written before the readers connected: leave them out.
    logs, sse = logs[10:], sse[10:]
    figures = {
        "lines": len(sse),
        "logs_f_p50_ms": round(statistics.median(logs) * 1000, 1),
        "sse_p50_ms": round(statistics.median(sse) * 1000, 1),
        "logs_f_p95_ms": round(sorted(logs)[int(len(logs) * 0.95) - 1] * 1000, 1),
        "sse_p95_ms": round(sorted(sse)[int(len(sse) * 0.95) - 1] * 1000, 1),
    }
    figures["sse_added_p50_ms"] = round(figures["sse_p50_ms"] - figures["logs_f_p50_ms"], 1)
    for k, v in figures.items():
        print(f"{k:>20}: {v}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
