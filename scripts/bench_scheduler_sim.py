"""scripts/bench scheduler-sim: the pure scheduler on a simulated mesh, in simulated time.

1,000 hosts x 8 H100 (2 NUMA nodes, NVLink; 25 racks as ``cluster`` labels) and 10,000 jobs (in
about 8,100 runs) of mixed shapes -- 1, 2, 4 and 8 GPUs, gangs of 2x4, 2x8 and 4x8 -- at priorities 0/10/50/90 from
three projects. A third of the runs is queued at the start, the rest arrive over time so that the
offered load is ``--load`` times the mesh's capacity; each run's true duration is drawn from a
log-normal (median 20 min), and 60% declare a ``max_duration`` above it (the only runtime bound the
scheduler may trust), rounded up to 30m/1h/2h/4h/8h as people write it. A fifth of the priority-0 runs are ``preemptible`` with ``retry``.

Events (arrivals, completions, preempted jobs finishing their graceful stop) are applied to a
real ``StateMachine``; after a change the scheduler runs at most once per ``--interval`` simulated
seconds (the leader batches the changes that commit while it plans), its decisions are applied as
``AssignJobs``/``PreemptJobs``/``SetPendingReasons`` and assigned jobs start at once.

Reported: placements per second of ``plan()`` (jobs placed / wall time spent inside it), GPU
utilization while jobs were waiting (the share of GPU-time in use whenever the queue was not
empty), and the p99 wait (submission to first start) of the highest priority. The last line is
JSON (keys in INTERFACE.md). The run is seeded: the same arguments give the same simulation.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshgpu.config.resources import parse_resources  # noqa: E402
from meshgpu.scheduler import plan  # noqa: E402
from meshgpu.state import (  # noqa: E402
    AssignJobs,
    JobFinished,
    JobStarted,
    JobStatus,
    JobTerminationReason,
    PreemptJobs,
    SetPendingReasons,
    StateMachine,
    SubmitRun,
)
from meshgpu.testing import host  # noqa: E402

SHAPES = [  # (nodes, GPUs per node, weight)
    (1, 1, 35),
    (1, 2, 20),
    (1, 4, 15),
    (1, 8, 15),
    (2, 4, 5),
    (2, 8, 6),
    (4, 8, 4),
]
PRIORITIES = [(0, 60), (10, 25), (50, 12), (90, 3)]
PROJECTS = ["vision", "nlp", "infra"]
MAX_DURATIONS = (1800, 3600, 7200, 14400, 28800)
STOP_DELAY_S = 20.0  # how long a preempted job takes to stop gracefully


def register_hosts(sm: StateMachine, hosts: int) -> None:
    links = [[0] * 8 for _ in range(8)]  # a known topology without NVLink
    for i in range(hosts):
        sm.apply_command(
            host(
                f"h{i:04d}",
                cpus=128,
                memory_gb=2048,
                disk_gb=8000,
                links=links,
                labels={"cluster": f"rack{i // 40:02d}", "fleet": "main"},
                at=0.0,
            )
        )


def make_runs(n: int, rng: random.Random, hosts: int, load: float) -> list[dict]:
    resources = {
        g: parse_resources({"gpu": f"H100:{g}"}).model_dump(mode="json") for g in (1, 2, 4, 8)
    }
    shapes = [(s[0], s[1]) for s in SHAPES]
    shape_w = [s[2] for s in SHAPES]
    prios = [p for p, _ in PRIORITIES]
    prio_w = [w for _, w in PRIORITIES]
    runs = []
    jobs = 0
    i = 0
    while jobs < n:
        nodes, gpus = rng.choices(shapes, shape_w)[0]
        if jobs + nodes > n:
            continue  # the last run fills the count exactly
        jobs += nodes
        i += 1
        priority = rng.choices(prios, prio_w)[0]
        duration = min(4 * 3600.0, max(120.0, rng.lognormvariate(math.log(1200), 0.9)))
        config: dict = {
            "type": "task",
            "commands": ["train"],
            "nodes": nodes,
            "priority": priority,
            "resources": resources[gpus],
        }
        if rng.random() < 0.6:
            # People write round limits: the first of 30m, 1h, 2h, 4h, 8h above a margin.
            bound = duration * rng.uniform(1.1, 1.5)
            config["max_duration"] = next(d for d in MAX_DURATIONS if d >= bound)
        if priority == 0 and rng.random() < 0.2:
            config["preemptible"] = True
            config["retry"] = {"on_events": ["interruption"], "duration": 3600}
        runs.append(
            {
                "name": f"r{i - 1:05d}",
                "project": rng.choice(PROJECTS),
                "config": config,
                "duration": duration,
                "gpus": nodes * gpus,
                "priority": priority,
            }
        )
    demand = sum(r["gpus"] * r["duration"] for r in runs)
    horizon = demand / (load * hosts * 8)
    backlog = len(runs) // 3
    for i, r in enumerate(runs):
        r["arrival"] = 0.0 if i < backlog else rng.uniform(0, horizon)
    runs.sort(key=lambda r: (r["arrival"], r["name"]))
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=10_000, help="jobs submitted (a gang's each)")
    ap.add_argument("--load", type=float, default=1.3, help="offered load / capacity")
    ap.add_argument("--interval", type=float, default=5.0, help="min simulated s between plans")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    wall0 = time.perf_counter()
    rng = random.Random(args.seed)
    sm = StateMachine()
    register_hosts(sm, args.hosts)
    runs = make_runs(args.jobs, rng, args.hosts, args.load)
    by_name = {r["name"]: r for r in runs}
    capacity = args.hosts * 8

    events: list[tuple[float, int, str, object]] = []
    seq = 0

    def push(at: float, kind: str, payload: object) -> None:
        nonlocal seq
        heapq.heappush(events, (at, seq, kind, payload))
        seq += 1

    for r in runs:
        push(r["arrival"], "submit", r["name"])

    busy_gpus = 0
    last_t = 0.0
    busy_area = 0.0  # GPU-seconds in use while the queue was not empty
    waiting_time = 0.0  # seconds the queue was not empty
    first_start: dict[str, float] = {}
    plan_s = 0.0
    plans = 0
    placements = 0
    preempted = 0
    plan_times: list[float] = []
    now = 0.0
    last_plan = -math.inf
    dirty = False
    jobs_total = 0

    def advance(to: float) -> None:
        nonlocal last_t, busy_area, waiting_time
        if sm.waiting_count and to > last_t:
            busy_area += busy_gpus * (to - last_t)
            waiting_time += to - last_t
        last_t = max(last_t, to)

    while events or dirty:
        if dirty and (not events or events[0][0] >= last_plan + args.interval):
            now = max(now, last_plan + args.interval)
        else:
            now = events[0][0]
        advance(now)
        while events and events[0][0] <= now:
            _, _, kind, payload = heapq.heappop(events)
            if kind == "submit":
                r = by_name[payload]
                sm.apply_command(
                    SubmitRun(
                        at=now,
                        request_id=r["name"],
                        run_id=r["name"],
                        run_name=r["name"],
                        project=r["project"],
                        config=r["config"],
                    )
                )
                jobs_total += r["config"]["nodes"]
                dirty = True
            else:
                job_id, epoch = payload
                job = sm.jobs.get(job_id)
                if job is None or job.epoch != epoch or job.status.is_finished():
                    continue  # superseded (preempted and requeued)
                if kind == "done" and job.status is JobStatus.TERMINATING:
                    continue  # being preempted: its "stopped" event reports it
                reason = (
                    JobTerminationReason.DONE_BY_RUNNER
                    if kind == "done"
                    else JobTerminationReason.TERMINATED_BY_USER
                )
                busy_gpus -= len(job.gpu_indices)
                sm.apply_command(JobFinished(at=now, job_id=job_id, epoch=epoch, reason=reason))
                dirty = True
        if not dirty or now < last_plan + args.interval:
            continue
        t0 = time.perf_counter()
        p = plan(sm, now=now)
        dt = time.perf_counter() - t0
        plan_s += dt
        plan_times.append(dt)
        plans += 1
        last_plan = now
        dirty = False
        if p.preemptions:
            res = sm.apply_command(PreemptJobs(at=now, preemptions=p.preemptions))
            for job_id in res.value["preempted"]:
                job = sm.jobs[job_id]
                push(now + STOP_DELAY_S, "stopped", (job_id, job.epoch))
                preempted += 1
        if p.assignments:
            res = sm.apply_command(AssignJobs(at=now, assignments=p.assignments))
            assert not res.value["refused"], res.value["refused"]
            for job_id in res.value["accepted"]:
                job = sm.jobs[job_id]
                sm.apply_command(JobStarted(at=now, job_id=job_id, epoch=job.epoch, started_at=now))
                busy_gpus += len(job.gpu_indices)
                first_start.setdefault(job.run_name, now)
                push(now + by_name[job.run_name]["duration"], "done", (job_id, job.epoch))
                placements += 1
        changed = {j: why for j, why in p.pending.items() if sm.jobs[j].why_pending != why}
        if changed:
            sm.apply_command(SetPendingReasons(at=now, reasons=changed))
        assert busy_gpus <= capacity

    wall = time.perf_counter() - wall0
    top = max(p for p, _ in PRIORITIES)
    waits = sorted(first_start[r["name"]] - r["arrival"] for r in runs if r["priority"] == top)
    p99 = waits[min(len(waits) - 1, int(math.ceil(0.99 * len(waits))) - 1)] if waits else 0.0
    plan_times.sort()
    result = {
        "hosts": args.hosts,
        "jobs": jobs_total,
        "placements_per_s": round(placements / plan_s) if plan_s else 0,
        "gpu_utilization": round(busy_area / (capacity * waiting_time), 4) if waiting_time else 0,
        "top_priority_wait_p99_s": round(p99, 1),
        "runs": len(runs),
        "placements": placements,
        "preemptions": preempted,
        "plans": plans,
        "plan_s": round(plan_s, 2),
        "plan_p50_ms": round(plan_times[len(plan_times) // 2] * 1000, 2) if plan_times else 0,
        "plan_max_ms": round(plan_times[-1] * 1000, 1) if plan_times else 0,
        "simulated_s": round(now),
        "interval_s": args.interval,
        "wall_s": round(wall, 1),
    }
    print(
        f"mesh: {args.hosts} hosts x 8 GPUs; {len(runs)} runs ({jobs_total} jobs), "
        f"load {args.load}x, plan at most every {args.interval:g} simulated s"
    )
    print(
        f"placements: {placements} in {plans} plans, {plan_s:.2f} s inside plan() -> "
        f"{result['placements_per_s']} placements/s (plan p50 {result['plan_p50_ms']} ms, "
        f"max {result['plan_max_ms']} ms)"
    )
    print(
        f"GPU utilization while jobs waited: {result['gpu_utilization']:.1%}; "
        f"preempted jobs: {preempted}"
    )
    print(
        f"priority {top} wait p99: {result['top_priority_wait_p99_s']} s over {len(waits)} runs; "
        f"simulated {now / 3600:.1f} h in {wall:.1f} s wall"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
