"""scripts/bench consensus-sim: how fast the deterministic simulator runs real Raft cores.

Runs a fixed amount of work - the same seeds, the same number of chaos events each, so the
simulated work is identical from run to run - and reports simulated events per wall-clock second
(an event is a tick, a message delivery, an fsync completion, a client request or a fault), plus
seeds per second and simulated time per wall-clock second. The last line is JSON (keys in
INTERFACE.md; ``events_per_s`` is the headline).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consensus.sim import run_seed  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=40, help="seeds to run (0..N-1)")
    ap.add_argument("--events", type=int, default=10_000, help="chaos events per seed")
    ap.add_argument("--nodes", type=int, default=5)
    args = ap.parse_args()

    events = 0
    virtual_us = 0
    violations = 0
    start = time.perf_counter()
    for seed in range(args.seeds):
        r = run_seed(seed, nodes=args.nodes, events=args.events)
        events += r.events
        virtual_us += r.virtual_us
        violations += not r.ok
    elapsed = time.perf_counter() - start

    result = {
        "events_per_s": round(events / elapsed),
        "seeds": args.seeds,
        "events": events,
        "elapsed_s": round(elapsed, 2),
        "seeds_per_s": round(args.seeds / elapsed, 2),
        "sim_seconds_per_s": round(virtual_us / 1e6 / elapsed, 1),
        "violations": violations,
        "nodes": args.nodes,
        "events_per_seed": args.events,
    }
    print(f"seeds: {args.seeds} x {args.events} chaos events, {args.nodes} founding voters")
    print(f"simulated events: {events} in {elapsed:.2f} s -> {result['events_per_s']} events/s")
    print(f"simulated time: {virtual_us / 1e6:.1f} s -> {result['sim_seconds_per_s']}x real time")
    print(f"seeds per second: {result['seeds_per_s']}; violations: {violations}")
    print(json.dumps(result))
    return 0 if violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
