"""A run's resource use (``meshgpu metrics``): a job's CPU, memory and GPU use is only visible
on the host that runs it, so the node asked samples its own jobs and asks each other host for
the jobs there -- over the peer port (``Peers.metrics``), as logs are proxied -- and that host
answers for itself only (``local``), so replicas that disagree about where a job runs can never
bounce a request around."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import trio

from meshgpu.errors import MeshError, Unavailable, job_not_found, run_not_found
from meshgpu.ops.history import MetricsHistory
from meshgpu.runner.usage import GroupUsage, cpu_percent, job_pgid, sample_groups

if TYPE_CHECKING:
    from meshgpu.gpu import GPUProvider
    from meshgpu.ops.peers import Peers
    from meshgpu.runner import ProcessRunner
    from meshgpu.state import JobRecord, StateMachine

SAMPLE_S = 0.5  # between the two CPU samples of ``meshgpu metrics``
PROXY_TIMEOUT_S = 10.0


def usage_of(runner: ProcessRunner, jobs: list[JobRecord]) -> dict[str, GroupUsage]:
    """Blocking: one ``/proc`` pass for the jobs' process groups (job id -> usage)."""
    groups = {j.job_id: job_pgid(runner.job_dir(j.job_id)) for j in jobs}
    sample = sample_groups(g for g in groups.values() if g is not None)
    return {jid: sample[g] for jid, g in groups.items() if g is not None and g in sample}


class Metrics:
    def __init__(
        self,
        state: StateMachine,
        runner: ProcessRunner,
        gpus: GPUProvider,
        node_id: str,
        node_name: str,
        peers: Peers,
    ) -> None:
        self.state, self.runner, self.gpus = state, runner, gpus
        self.node_id, self.node_name = node_id, node_name
        self.peers = peers  # other members, over the peer port
        self.history = MetricsHistory()  # this host's GPUs and jobs over time (ops/history.py)

    async def sample_forever(self, interval_s: float | None = None) -> None:
        """Feed ``history`` every ``interval_s`` (default: its own interval) until cancelled."""
        interval = interval_s or self.history.interval_s
        self.history.interval_s = interval
        while True:
            await self.sample_history()
            await trio.sleep(interval)

    async def sample_history(self) -> None:
        """One sample of this host's GPUs and running jobs into ``history``."""
        jobs = self.state.jobs_on_node(self.node_id)

        def take() -> tuple[float, float, list[Any], dict[str, GroupUsage]]:
            return (
                time.time(),
                time.monotonic(),
                [dataclasses.asdict(t) for t in self.gpus.telemetry()],
                usage_of(self.runner, jobs),
            )

        t, mono, telemetry, usage = await trio.to_thread.run_sync(take)
        self.history.record(t, mono, telemetry, usage)

    async def history_of(
        self, name: str, job: int | None, *, since_s: float, points: int, local: bool
    ) -> dict[str, Any]:
        """``GET /api/v1/runs/{name}/history``: each job's samples of the last ``since_s``
        seconds (at most ``points`` per series), read here for the jobs this host ran and asked
        of their hosts for the others (``local``: this host's only)."""
        record = self.state.runs.get(name)
        if record is None:
            raise run_not_found(name)
        jobs = self.state.run_jobs(record)
        if job is not None:
            if not 0 <= job < len(jobs):
                raise job_not_found(name, len(jobs))
            jobs = [jobs[job]]
        until = time.time()
        since = until - since_s
        entries: dict[str, dict[str, Any]] = {}

        def here(j: JobRecord) -> dict[str, Any]:
            return self._job_base(j) | self.history.job(
                j.job_id, j.gpu_indices, since, until, points
            )

        async def remote(j: JobRecord, owner_id: str, owner_name: str) -> None:
            base = self._job_base(j)
            try:
                doc = await self.peers.history(
                    owner_id, name, j.job_num, since_s, points, timeout=PROXY_TIMEOUT_S
                )
                entries[j.job_id] = (doc.get("jobs") or [base | {"error": "no samples"}])[0]
            except Unavailable as e:
                entries[j.job_id] = base | {"error": f"cannot reach {owner_name}: {e}"}
            except MeshError as e:
                entries[j.job_id] = base | {"error": f"{owner_name} answered: {e.title}"}

        async with trio.open_nursery() as nursery:
            for j in jobs:
                owner = self.state.nodes.get(j.node_id or "")
                if j.node_id == self.node_id:
                    entries[j.job_id] = here(j)
                elif owner is None:
                    entries[j.job_id] = self._job_base(j) | {
                        "error": "the job has not run yet" if not j.node_id else "unknown host"
                    }
                elif local:
                    entries[j.job_id] = self._job_base(j) | {
                        "error": f"this node ({self.node_name}) does not run the job"
                    }
                else:
                    nursery.start_soon(remote, j, owner.node_id, owner.name)
        return {
            "run": name,
            "since": round(since, 3),
            "until": round(until, 3),
            "interval_s": self.history.interval_s,
            "jobs": [entries[j.job_id] for j in jobs],
        }

    def _job_base(self, j: JobRecord) -> dict[str, Any]:
        node = self.state.nodes.get(j.node_id) if j.node_id else None
        return {
            "job_num": j.job_num,
            "job_id": j.job_id,
            "replica_num": j.replica_num,
            "group": j.group,
            "status": j.status.value,
            "node": node.name if node else None,
            "node_id": j.node_id,
            "sampled_at": None,
            "cpu_pct": None,
            "cpu_seconds": None,
            "memory_bytes": None,
            "processes": None,
            "gpus": [],
            "error": None,
        }

    async def _sample_here(self, jobs: list[JobRecord]) -> dict[str, dict[str, Any]]:
        """Two samples ``SAMPLE_S`` apart (CPU percent needs an interval) and the GPUs' telemetry."""

        def first() -> tuple[float, dict[str, GroupUsage]]:
            return time.monotonic(), usage_of(self.runner, jobs)

        def second() -> tuple[float, dict[str, GroupUsage], list[Any]]:
            return time.monotonic(), usage_of(self.runner, jobs), self.gpus.telemetry()

        t0, before = await trio.to_thread.run_sync(first)
        await trio.sleep(SAMPLE_S)
        t1, after, telemetry = await trio.to_thread.run_sync(second)
        tele = {t.index: dataclasses.asdict(t) for t in telemetry}
        me = self.state.nodes.get(self.node_id)
        static = {g.index: g for g in me.gpus} if me is not None else {}
        out = {}
        now = time.time()
        for j in jobs:
            entry = self._job_base(j)
            u = after.get(j.job_id)
            entry.update(
                sampled_at=now,
                cpu_pct=cpu_percent(before.get(j.job_id), u, t1 - t0),
                cpu_seconds=u.cpu_seconds if u else None,
                memory_bytes=u.memory_bytes if u else None,
                processes=u.processes if u else 0,
                gpus=[
                    {
                        "index": i,
                        "uuid": static[i].uuid if i in static else None,
                        "name": static[i].name if i in static else None,
                        "memory_mib": static[i].memory_mib if i in static else None,
                        **{k: v for k, v in tele.get(i, {}).items() if k != "index"},
                    }
                    for i in j.gpu_indices
                ],
            )
            if u is None:
                entry["error"] = "no live process of the job on this host"
            out[j.job_id] = entry
        return out

    async def _ask_owner(self, j: JobRecord, run: str) -> dict[str, Any]:
        entry = self._job_base(j)
        owner = self.state.nodes.get(j.node_id or "")
        if owner is None:
            entry["error"] = "the host running the job is not known"
            return entry
        try:
            doc = await self.peers.metrics(owner.node_id, run, j.job_num, timeout=PROXY_TIMEOUT_S)
        except Unavailable as e:
            entry["error"] = f"cannot reach {owner.name}: {e}"
            return entry
        except MeshError as e:
            entry["error"] = f"{owner.name} answered: {e.title}"
            return entry
        jobs = doc.get("jobs") or [entry | {"error": f"{owner.name} sent no sample"}]
        return jobs[0]

    async def run(self, name: str, job: int | None, *, local: bool) -> dict[str, Any]:
        """``GET /api/v1/runs/{name}/metrics``: a sample of each job (or of job ``job``), taken
        here for the jobs here and asked of their hosts for the others (``local``: this host's
        jobs only; the others say so)."""
        record = self.state.runs.get(name)
        if record is None:
            raise run_not_found(name)
        jobs = self.state.run_jobs(record)
        if job is not None:
            if not 0 <= job < len(jobs):
                raise job_not_found(name, len(jobs))
            jobs = [jobs[job]]
        entries: dict[str, dict[str, Any]] = {}
        here: list[JobRecord] = []
        elsewhere: list[JobRecord] = []
        for j in jobs:
            if not j.node_id or not j.status.holds_resources():
                entries[j.job_id] = self._job_base(j) | {
                    "error": "the job has finished"
                    if j.status.is_finished()
                    else "the job is not running yet"
                }
            elif j.node_id == self.node_id:
                here.append(j)
            elif local:
                entries[j.job_id] = self._job_base(j) | {
                    "error": f"this node ({self.node_name}) does not run the job"
                }
            else:
                elsewhere.append(j)

        async def remote(j: JobRecord) -> None:
            entries[j.job_id] = await self._ask_owner(j, name)

        async def local_jobs() -> None:
            entries.update(await self._sample_here(here))

        async with trio.open_nursery() as nursery:
            if here:
                nursery.start_soon(local_jobs)
            for j in elsewhere:
                nursery.start_soon(remote, j)
        return {"run": name, "jobs": [entries[j.job_id] for j in jobs]}
