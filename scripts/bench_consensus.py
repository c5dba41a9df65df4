"""scripts/bench consensus: a 3-member KV cluster on loopback (mutual TLS, default timing:
100 ms ticks, election timeout 10 ticks), measured in one run:

- the disk's fsync floor (p50 of write+fsync of one small record, same filesystem);
- sequential commit latency with one client talking to the leader (p50/p99);
- throughput with 64 concurrent clients (one connection each, to the leader);
- mean entries per fsync on the leader during the throughput phase (group commit);
- leader failover: SIGKILL the leader, time until a write through a survivor succeeds
  (5 repetitions; the killed member is restarted and caught up between them).

The last line is JSON with the keys in INTERFACE.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consensus.kv.harness import LocalCluster  # noqa: E402
from consensus.storage import fsync_floor  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def main(args: argparse.Namespace) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="bench-consensus-", dir=args.dir))
    floor = fsync_floor(root, 300)
    cluster = LocalCluster(root / "cluster", 3, tls=not args.plaintext)
    out: dict[str, float] = {"fsync_p50_ms": statistics.median(floor) * 1000}
    print(f"fsync floor: p50 {out['fsync_p50_ms']:.3f} ms")
    try:
        await cluster.start()
        leader = await cluster.leader()
        c = cluster.members[leader].client()
        for i in range(50):  # warm up connections and caches
            await c.put("warm", i)
        lat = []
        for i in range(args.sequential):
            t = time.perf_counter()
            r = await c.put("seq", i)
            lat.append(time.perf_counter() - t)
            assert r["ok"], r
        await c.aclose()
        out["commit_p50_ms"] = pct(lat, 50) * 1000
        out["commit_p99_ms"] = pct(lat, 99) * 1000
        print(
            f"sequential commit (1 client, {args.sequential} puts): p50 {out['commit_p50_ms']:.2f} ms, "
            f"p99 {out['commit_p99_ms']:.2f} ms"
        )

        before = await cluster.status(leader)
        done = 0
        deadline = trio.current_time() + args.duration

        async def worker(k: int) -> None:
            nonlocal done
            cl = cluster.members[leader].client()
            i = 0
            while trio.current_time() < deadline:
                r = await cl.put(f"k{k}", i)
                assert r["ok"], r
                done += 1
                i += 1
            await cl.aclose()

        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for k in range(64):
                n.start_soon(worker, k)
        elapsed = time.perf_counter() - t0
        after = await cluster.status(leader)
        out["throughput_64"] = done / elapsed
        writes = after["writes"] - before["writes"]
        out["entries_per_fsync"] = (after["entries_written"] - before["entries_written"]) / max(
            1, writes
        )
        print(
            f"64 clients: {done} puts in {elapsed:.1f} s = {out['throughput_64']:.0f} commits/s; "
            f"leader wrote {out['entries_per_fsync']:.1f} entries per fsync"
        )

        failovers = []
        for rep in range(args.failovers):
            leader = await cluster.leader()
            survivors = [i for i in cluster.ids if i != leader]
            victim = cluster.members[leader]
            cl = cluster.members[survivors[rep % 2]].client()
            await cl.put("pre", rep)
            t = time.perf_counter()
            victim.kill()
            while True:
                try:
                    with trio.move_on_after(2):
                        r = await cl.put("failover", rep, timeout=1.5)
                        if r["ok"]:
                            break
                except (OSError, trio.BrokenResourceError):
                    await cl.aclose()
            failovers.append(time.perf_counter() - t)
            await cl.aclose()
            await victim.start()
            with trio.fail_after(30):  # let it catch up before the next round
                while True:
                    sts = [await cluster.status(i) for i in cluster.ids]
                    if all(sts) and len({s["applied"] for s in sts}) == 1:
                        break
                    await trio.sleep(0.1)
            print(f"failover {rep + 1}: {failovers[-1] * 1000:.0f} ms")
        out["failover_p50_ms"] = statistics.median(failovers) * 1000
        out["failover_max_ms"] = max(failovers) * 1000
    finally:
        cluster.shutdown()
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--sequential", type=int, default=1000)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--failovers", type=int, default=5)
    p.add_argument("--plaintext", action="store_true")
    p.add_argument("--dir", default=None, help="where data goes (default: the temp dir)")
    a = p.parse_args()
    res = trio.run(main, a)
    print(json.dumps({k: round(v, 3) for k, v in res.items()}))
