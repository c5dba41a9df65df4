"""How long a snapshot blocks the Raft owner task with a large state (``--runs`` queued runs,
built as ``scripts/bench_list.py`` builds them).

- before: the snapshot as the owner task used to take it, all on the event loop: the state
  encoded to JSON (twice: the jobs document, decoded and encoded again inside the cluster's),
  wrapped in msgpack with the dedup window, written to a file and recorded (fsync). The owner
  -- which sends the heartbeats -- was blocked for the whole of it.
- after: what stays in the owner task (a consistent copy: ``snapshot_view`` plus the dedup
  window), and, while the encoding and the write run in a worker thread, the worst lateness of a
  task that wakes every millisecond on the same loop (what a heartbeat would wait).

The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consensus.core import ConfState, SnapshotMetadata  # noqa: E402
from consensus.storage import DiskStorage  # noqa: E402
from meshgpu.state.cluster import Replicated  # noqa: E402
from scripts.bench_list import build  # noqa: E402


def before_snapshot(r: Replicated) -> bytes:
    """The snapshot as it was taken before (on the loop: the jobs state's JSON decoded and
    encoded again)."""
    jobs = r.jobs
    doc = {
        "applied_index": jobs.applied_index,
        "demand_version": jobs.demand_version,
        "nodes": [n.model_dump(mode="json") for n in jobs.nodes.values()],
        "runs": [x.to_doc() for x in jobs.runs.values()],
        "jobs": [j.model_dump(mode="json") for j in jobs.jobs.values()],
        "requests": jobs.requests,
    }
    inner = json.dumps(doc, separators=(",", ":")).encode()
    return json.dumps(
        {"jobs": json.loads(inner), "cluster": r.cluster.snapshot_doc()}, separators=(",", ":")
    ).encode()


async def measure(r: Replicated, dedup: dict[bytes, int], tmp: Path) -> dict[str, float]:
    storage = DiskStorage(tmp / "raft")
    storage.initialize(ConfState(frozenset({1})))
    index = iter(range(1, 1_000_000))
    out: dict[str, float] = {}

    # before: everything on the loop
    t0 = time.perf_counter()
    data = msgpack.packb({"fsm": before_snapshot(r), "dedup": list(dedup.items())})
    storage.persist_snapshot(SnapshotMetadata(next(index), 1, ConfState(frozenset({1}))), data)
    out["before_on_loop_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    out["snapshot_mb"] = round(len(data) / 2**20, 1)

    # after: a copy on the loop; encoding and writing in a worker thread
    worst = 0.0
    done = trio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            t = time.perf_counter()
            await trio.sleep(0.001)
            worst = max(worst, time.perf_counter() - t - 0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0.01)
        worst = 0.0
        t0 = time.perf_counter()
        view = r.snapshot_view()
        window = list(dedup.items())
        out["after_on_loop_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        data = await trio.to_thread.run_sync(
            lambda: msgpack.packb({"fsm": view(), "dedup": window})
        )
        meta = SnapshotMetadata(next(index), 1, ConfState(frozenset({1})))
        await trio.to_thread.run_sync(storage.persist_snapshot, meta, data)
        out["after_total_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        out["after_worst_loop_lateness_ms"] = round(worst * 1000, 1)
        done.set()
    storage.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=6000)
    ap.add_argument("--repeat", type=int, default=3, help="best of N")
    args = ap.parse_args()
    sm, _ = build(args.runs)
    r = Replicated()
    r.jobs = sm
    dedup = {os.urandom(16): i for i in range(2 * args.runs)}
    results = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as d:
            results.append(trio.run(measure, r, dedup, Path(d)))
    best = {k: min(x[k] for x in results) for k in results[0]}
    print(f"runs={args.runs} snapshot={best['snapshot_mb']} MiB (best of {args.repeat})")
    print(f"  before: owner task blocked {best['before_on_loop_ms']} ms")
    print(
        f"  after:  owner task blocked {best['after_on_loop_ms']} ms (the copy); "
        f"encode+write {best['after_total_ms']} ms in a thread, "
        f"worst loop lateness (the copy included) {best['after_worst_loop_lateness_ms']} ms"
    )
    print(json.dumps({"runs": args.runs, **best}))


if __name__ == "__main__":
    main()
