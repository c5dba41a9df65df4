"""scripts/bench console: how fast the console's pages are served with 1,000 runs in the state
(issue target: a page in <= 50 ms p50), through the real app in-process (an ASGI transport, no
sockets, no TLS): the runs page, its live fragment (what the browser polls every 2 s), one run's
page, the nodes page and the cluster page, signed in with the console's cookie.

The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshgpu.api.app import create_app  # noqa: E402
from meshgpu.api.ui import COOKIE  # noqa: E402
from meshgpu.state import StateMachine, SubmitRun  # noqa: E402
from meshgpu.testing import host  # noqa: E402
from tests.api._stub import TOKEN, StubAgent  # noqa: E402

CONFIG = {"type": "task", "commands": ["python train.py"], "resources": {"gpu": "H100:1"}}
PAGES = {
    "runs": "/ui/runs",
    "runs_fragment": "/ui/fragments/runs",
    "run": "/ui/runs/run-00500",
    "nodes": "/ui/nodes",
    "cluster": "/ui/cluster",
}


def build(n: int) -> StateMachine:
    from meshgpu.config import parse_config
    from meshgpu.config.render import to_json

    config = to_json(
        parse_config(
            "type: task\ncommands: [python train.py]\nresources:\n  gpu: H100:1\n", "b.yml"
        )
    )
    sm = StateMachine()
    for k in range(4):
        sm.apply_command(host(f"n{k + 1}", 8))
    for i in range(n):
        sm.apply_command(
            SubmitRun(
                at=1_000.0 + i,
                request_id=f"req-{i:06d}",
                run_id=f"{i:032x}",
                run_name=f"run-{i:05d}",
                config=json.loads(json.dumps(config)),
            )
        )
    return sm


async def measure(sm: StateMachine, tmp: Path, rounds: int) -> dict[str, float]:
    app = create_app(StubAgent(sm, tmp))
    out: dict[str, float] = {}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://node", cookies={COOKIE: TOKEN}
    ) as c:
        for name, path in PAGES.items():
            r = await c.get(path)
            assert r.status_code == 200, (path, r.status_code, r.text[:200])
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                r = await c.get(path)
                times.append((time.perf_counter() - t0) * 1000)
            times.sort()
            out[f"{name}_p50_ms"] = round(statistics.median(times), 2)
            out[f"{name}_p95_ms"] = round(times[int(len(times) * 0.95) - 1], 2)
            out[f"{name}_bytes"] = len(r.content)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=50)
    a = ap.parse_args()
    sm = build(a.runs)
    with tempfile.TemporaryDirectory() as tmp:
        figures = trio.run(measure, sm, Path(tmp), a.rounds)
    for k, v in figures.items():
        print(f"{k:>24}: {v}")
    print(json.dumps({"runs": a.runs, **figures}))


if __name__ == "__main__":
    main()
