"""scripts/bench list: what 6,000 queued runs cost in the state and in ``GET /api/v1/runs``.

- memory: the state machine's allocations (tracemalloc) and the process's RSS growth for
  ``--runs`` queued one-GPU tasks (each configuration parsed from YAML and stored as the agent
  stores it: every field, defaults filled), per run;
- answers: ``GET /api/v1/runs?all=true`` through the real app in-process (an ASGI transport, no
  sockets): the size and time of the first answer, and of walking every page with
  ``next_cursor`` (time includes decoding each page), with the default page and with
  ``limit=1000`` (what the client asks for); an API without pages answers everything at once,
  one page. And a single ``GET /api/v1/runs/{name}`` (which keeps the configuration).

The last line is JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshgpu.config import parse_config  # noqa: E402
from meshgpu.config.render import to_json  # noqa: E402
from meshgpu.state import StateMachine, SubmitRun  # noqa: E402
from meshgpu.testing import host, rss_mb  # noqa: E402
from tests.api._stub import StubAgent, api  # noqa: E402

CONFIG = """\
type: task
name: train
commands:
  - pip install -r requirements.txt
  - python train.py --epochs 10
env:
  - WANDB_PROJECT=bench
resources:
  gpu: H100:80GB:8
  shm_size: 16GB
max_duration: 2h
"""


def build(n: int) -> tuple[StateMachine, dict[str, float]]:
    config = to_json(parse_config(CONFIG, "bench.dstack.yml"))
    sm = StateMachine()
    sm.apply_command(host("n1", 8))
    gc.collect()
    rss0 = rss_mb(os.getpid())
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    for i in range(n):
        # Each run its own copy, as each decoded log entry is.
        sm.apply_command(
            SubmitRun(
                at=1_000.0 + i,
                request_id=f"req-{i:06d}",
                run_id=f"{i:032x}",
                run_name=f"run-{i:05d}",
                config=json.loads(json.dumps(config)),
            )
        )
    gc.collect()
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = rss_mb(os.getpid())
    return sm, {
        "state_bytes_per_run": round((after - before) / n),
        "state_mb": round((after - before) / 2**20, 1),
        "rss_growth_mb": round(rss1 - rss0, 1),
        "config_json_bytes": len(json.dumps(config)),
    }


async def walk(c: httpx.AsyncClient, limit: int | None) -> dict[str, float]:
    """Every run, page after page (the first page's figures apart)."""
    params = {"all": "true"} | ({"limit": str(limit)} if limit else {})
    t0 = time.perf_counter()
    r = await c.get("/api/v1/runs", params=params)
    first_ms = (time.perf_counter() - t0) * 1000
    first_bytes = len(r.content)
    doc = r.json()
    pages, total, runs = 1, len(r.content), len(doc["runs"])
    cursor = doc.get("next_cursor")
    while cursor:
        r = await c.get("/api/v1/runs", params=params | {"cursor": cursor})
        doc = r.json()
        pages, total, runs = pages + 1, total + len(r.content), runs + len(doc["runs"])
        cursor = doc.get("next_cursor")
    return {
        "first_ms": round(first_ms, 1),
        "first_bytes": first_bytes,
        "all_ms": round((time.perf_counter() - t0) * 1000, 1),
        "all_bytes": total,
        "pages": pages,
        "runs": runs,
    }


async def measure(sm: StateMachine, tmp: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    async with api(StubAgent(sm, tmp)) as c:
        await c.get("/api/v1/runs", params={"limit": 1})  # warm up
        for name, limit in (("default", None), ("limit1000", 1000)):
            out |= {f"{name}_{k}": v for k, v in (await walk(c, limit)).items()}
        t0 = time.perf_counter()
        one = await c.get("/api/v1/runs/run-00000")
        out["one_run_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        out["one_run_bytes"] = len(one.content)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=6000)
    args = p.parse_args()
    sm, figures = build(args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        figures |= trio.run(measure, sm, Path(tmp))
    width = max(map(len, figures))
    for k, v in figures.items():
        print(f"{k:<{width}}  {v}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
