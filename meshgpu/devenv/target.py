"""Which job an SSH username names, and whether this host may open sessions into it.

The SSH username is the job selector: ``RUN`` (the run's job 0), ``RUN-N`` (its job N, in the
order ``meshgpu logs --job N`` counts) or a job id. A run whose own name ends in ``-N`` wins
over job N of a run named by the rest. Pure: reads the replicated state (call it on the trio
loop, which owns that state)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshgpu.state import JobStatus
from meshgpu.state.cluster import may_see

if TYPE_CHECKING:
    from meshgpu.state import JobRecord, RunRecord, StateMachine
    from meshgpu.state.cluster import ClusterState

_JOB_SUFFIX = re.compile(r"(.+)-(\d+)")


@dataclass(frozen=True, slots=True)
class Target:
    """A job this host serves sessions into."""

    job_id: str
    run_name: str
    job_num: int  # its place in the run (``RUN-N``)
    project: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """``key_ok`` False: refuse the key (unknown, or not allowed to see the job's project: the
    client learns nothing more). Else ``target`` or ``error`` (said to the client, then it is
    disconnected)."""

    key_ok: bool
    target: Target | None = None
    error: str = ""


def find_job(state: StateMachine, selector: str) -> tuple[RunRecord, int, JobRecord] | None:
    run = state.runs.get(selector)
    num = 0
    if run is None:
        m = _JOB_SUFFIX.fullmatch(selector)
        if m is not None and m.group(1) in state.runs:
            run, num = state.runs[m.group(1)], int(m.group(2))
    if run is None:
        job = state.jobs.get(selector)
        if job is None or job.run_name not in state.runs:
            return None
        run = state.runs[job.run_name]
        ids = run.job_ids
        return (run, ids.index(job.job_id) if job.job_id in ids else job.job_num, job)
    jobs = state.run_jobs(run)
    if not 0 <= num < len(jobs):
        return (run, num, None)  # type: ignore[return-value]
    return (run, num, jobs[num])


def judge(
    state: StateMachine, cluster: ClusterState, node_id: str, username: str, fingerprint: str
) -> Verdict:
    """May the key ``fingerprint`` open sessions as ``username`` on this host (``node_id``)?"""
    key = cluster.ssh_keys.get(fingerprint)
    if key is None:
        return Verdict(False)
    found = find_job(state, username)
    if found is None:
        return Verdict(True, error=f"no run or job named {username!r} (see meshgpu ps)")
    run, num, job = found
    if not may_see(key, run.project, cluster.access):
        return Verdict(False)
    if job is None:
        n = len(run.job_ids)
        return Verdict(True, error=f"run {run.run_name!r} has no job {num} (jobs 0..{n - 1})")
    what = f"run {run.run_name!r} job {num}"
    if job.status.is_finished():
        why = f": {job.termination_reason}" if job.termination_reason else ""
        return Verdict(True, error=f"{what} has ended ({job.status}{why})")
    if job.node_id != node_id:
        where = state.nodes.get(job.node_id) if job.node_id else None
        place = f"host {where.name}" if where is not None else "no host yet"
        return Verdict(
            True,
            error=f"{what} runs on {place}, not here: connect through `meshgpu attach` / "
            f"`meshgpu ssh-proxy {username}`",
        )
    if job.status != JobStatus.RUNNING:
        return Verdict(True, error=f"{what} is not running yet ({job.status}); try again shortly")
    return Verdict(True, Target(job.job_id, run.run_name, num, run.project))


def still_serves(state: StateMachine, node_id: str, job_id: str) -> str | None:
    """Why sessions into ``job_id`` must end now (None: they may go on)."""
    job = state.jobs.get(job_id)
    if job is None:
        return "the job is gone"
    if job.status.is_finished():
        why = f": {job.termination_reason}" if job.termination_reason else ""
        return f"the job has ended ({job.status}{why})"
    if job.node_id != node_id:
        return "the job no longer runs on this host"
    return None
