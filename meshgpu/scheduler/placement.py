"""The placement loop's pure core: (state) -> assignments and why-pending reasons.

Waiting jobs are taken in queue order -- priority (high first), then submission time, then job
number -- and each run's waiting jobs (its gang) are placed together or not at all. A gang that
cannot be placed now *reserves* the hosts it could use once they free up: gangs behind it may
only use other hosts, so smaller jobs backfill around a blocked head without ever delaying it,
and nothing starves. The leader runs this whenever demand or capacity changes and commits the
result as ``AssignJobs`` (re-checked at apply time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshgpu.scheduler.matching import choose_gpus, host_fits, job_key, job_resources
from meshgpu.state.commands import Assignment
from meshgpu.state.machine import StateMachine
from meshgpu.state.records import JobRecord, NodeRecord, RunRecord

QUEUED = "waiting for capacity: earlier or higher-priority runs are ahead in the queue"


@dataclass
class Plan:
    assignments: list[Assignment] = field(default_factory=list)
    pending: dict[str, str] = field(default_factory=dict)  # job_id -> why it waits


def _gangs(state: StateMachine) -> list[tuple[RunRecord, list[JobRecord]]]:
    by_run: dict[str, list[JobRecord]] = {}
    for job in state.waiting_jobs():
        by_run.setdefault(job.run_name, []).append(job)
    gangs = []
    for name, jobs in by_run.items():
        run = state.runs[name]
        jobs.sort(key=lambda j: j.job_num)
        gangs.append((run, jobs))
    gangs.sort(key=lambda rj: (-rj[0].priority, rj[0].submitted_at, rj[0].run_name))
    return gangs


def plan(state: StateMachine) -> Plan:
    out = Plan()
    nodes = [
        n for n in sorted(state.nodes.values(), key=lambda n: n.node_id) if n.status == "active"
    ]
    free = {n.node_id: {g.index for g in n.gpus} - state.gpus_in_use(n.node_id) for n in nodes}
    reserved: dict[str, str] = {}  # node_id -> run that waits for it
    feasible_cache: dict[tuple[str, bool], list[NodeRecord]] = {}
    for run, jobs in _gangs(state):
        image = bool(run.config.get("image"))
        if len(reserved) == len(nodes) and nodes:
            # Every host is spoken for by a gang ahead: nothing behind can be placed now. Only
            # say why, and only where the reason changes (a long queue stays cheap).
            for job in jobs:
                key = (job_key(job), image)
                feasible = feasible_cache.get(key)
                if feasible is None:
                    res = job_resources(job)
                    feasible = feasible_cache[key] = [
                        n for n in nodes if not host_fits(res, n, image)
                    ]
                if feasible and job.why_pending == QUEUED:
                    continue
                if feasible:
                    out.pending[job.job_id] = QUEUED
                else:
                    reasons = "; ".join(host_fits(job_resources(job), n, image) for n in nodes)
                    out.pending[job.job_id] = f"no host can ever run it: {reasons}"
            continue
        tentative: list[Assignment] = []
        taken: dict[str, set[int]] = {}
        why = ""
        for job in jobs:
            res = job_resources(job)
            feasible = [n for n in nodes if not host_fits(res, n, image)]
            if not feasible:
                reasons = (
                    "; ".join(host_fits(res, n, image) for n in nodes)
                    or "the mesh has no active nodes"
                )
                why = f"no host can ever run it: {reasons}"
                break
            placed = False
            best_free = (0, "")
            for node in feasible:
                if node.node_id in reserved:
                    continue
                avail = free[node.node_id] - taken.get(node.node_id, set())
                fit = choose_gpus(res, node, avail)
                if fit.gpu_indices is not None:
                    tentative.append(
                        Assignment(
                            job_id=job.job_id,
                            node_id=node.node_id,
                            gpu_indices=list(fit.gpu_indices),
                        )
                    )
                    taken.setdefault(node.node_id, set()).update(fit.gpu_indices)
                    placed = True
                    break
                best_free = max(best_free, (len(avail), node.name))
            if not placed:
                if best_free[0] == 0 and all(n.node_id in reserved for n in feasible):
                    # Stable wording (no names, no positions): reasons are replicated only when
                    # they change, and a queue of thousands must not rewrite them on every pass.
                    why = QUEUED
                else:
                    where = (
                        f"; largest free: {best_free[0]} on {best_free[1]}" if best_free[1] else ""
                    )
                    why = f"needs {res.gpu.to_spec() if res.gpu.count.max != 0 else 'CPU only'} on one host{where}"
                # Reserve what this gang could use, so later gangs cannot delay it.
                for n in feasible:
                    reserved.setdefault(n.node_id, run.run_name)
                break
        if why:
            for job in jobs:
                out.pending[job.job_id] = why
            continue
        for a in tentative:
            free[a.node_id] -= set(a.gpu_indices)
        out.assignments.extend(tentative)
    return out
