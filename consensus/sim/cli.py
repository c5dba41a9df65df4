"""Command line: ``run`` many seeds, ``replay`` one with its trace."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .simulator import SeedResult, run_seed

DEFAULT_EVENTS = 10000
DEFAULT_NODES = 5


def _replay_hint(r: SeedResult, events: int, nodes: int) -> str:
    extra = ""
    if events != DEFAULT_EVENTS:
        extra += f" --events {events}"
    if nodes != DEFAULT_NODES:
        extra += f" --nodes {nodes}"
    return f"python -m consensus.sim replay {r.seed}{extra}"


def cmd_run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    violations = 0
    events = 0
    for seed in range(args.seed_start, args.seed_start + args.seeds):
        r = run_seed(seed, nodes=args.nodes, events=args.events)
        events += r.events
        if not r.ok:
            violations += 1
            print(
                f"seed={seed} violation={r.violation} "
                f"(replay: {_replay_hint(r, args.events, args.nodes)})",
                flush=True,
            )
            if violations <= args.traces:
                # The compact trace: re-run the seed with tracing (it replays bit for bit).
                traced = run_seed(seed, nodes=args.nodes, events=args.events, trace=True)
                print(f"--- seed {seed}: last {args.trace_tail} trace lines", file=sys.stderr)
                for line in (traced.trace or [])[-args.trace_tail :]:
                    print(f"    {line}", file=sys.stderr)
        if args.progress and (seed - args.seed_start + 1) % args.progress == 0:
            done = seed - args.seed_start + 1
            print(
                f"progress seeds={done} violations={violations} "
                f"elapsed_s={time.monotonic() - start:.1f}",
                file=sys.stderr,
                flush=True,
            )
    elapsed = time.monotonic() - start
    print(
        f"elapsed_s={elapsed:.1f} events={events} events_per_s={events / max(elapsed, 1e-9):.0f}",
        file=sys.stderr,
    )
    print(f"seeds={args.seeds} violations={violations}", flush=True)
    return 0 if violations == 0 else 1


def cmd_replay(args: argparse.Namespace) -> int:
    r = run_seed(args.seed, nodes=args.nodes, events=args.events, trace=True)
    trace = r.trace or []
    shown = trace if args.full else trace[-args.tail :]
    if len(shown) < len(trace):
        print(f"... {len(trace) - len(shown)} earlier trace lines (use --full)")
    for line in shown:
        print(line)
    print(
        f"seed={r.seed} events={r.events} virtual_ms={r.virtual_us / 1000:.1f} "
        + " ".join(f"{k}={v}" for k, v in sorted(r.stats.items()))
    )
    if r.ok:
        print(f"seed={r.seed} ok")
        return 0
    print(f"seed={r.seed} violation={r.violation}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m consensus.sim", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run many seeds; exit status 0 only without violations")
    run.add_argument("--seeds", type=int, default=100)
    run.add_argument("--seed-start", type=int, default=0)
    run.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="chaos events per seed")
    run.add_argument("--nodes", type=int, default=DEFAULT_NODES, help="founding voters")
    run.add_argument("--progress", type=int, default=0, help="report every N seeds on stderr")
    run.add_argument(
        "--traces", type=int, default=1, help="print the trace of the first N failing seeds"
    )
    run.add_argument("--trace-tail", type=int, default=25, help="trace lines per failing seed")
    run.set_defaults(func=cmd_run)
    rep = sub.add_parser("replay", help="re-run one seed bit for bit and print its trace")
    rep.add_argument("seed", type=int)
    rep.add_argument("--events", type=int, default=DEFAULT_EVENTS)
    rep.add_argument("--nodes", type=int, default=DEFAULT_NODES)
    rep.add_argument("--tail", type=int, default=80, help="trace lines to print (the last N)")
    rep.add_argument("--full", action="store_true", help="print the whole trace")
    rep.set_defaults(func=cmd_replay)
    args = ap.parse_args(argv)
    return int(args.func(args))
