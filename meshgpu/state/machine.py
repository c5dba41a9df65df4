"""The replicated state machine: ``apply`` turns committed commands into state, deterministically.

Every member applies the same commands in the same order and must reach the same state, so
``apply`` reads no clock, draws no random numbers and does no I/O; it also never raises for a
command that is merely refused (a name already in use, a stale assignment): it returns a
``Result`` saying so, because the command is already in everyone's log.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from meshgpu.state.commands import (
    AssignJobs,
    JobFinished,
    JobStarted,
    PruneRuns,
    RegisterNode,
    SetPendingReasons,
    StopRun,
    SubmitRun,
    decode,
)
from meshgpu.state.records import (
    JobRecord,
    JobStatus,
    JobTerminationReason,
    NodeRecord,
    RunRecord,
    RunStatus,
    RunTerminationReason,
)


@dataclass(frozen=True, slots=True)
class Result:
    ok: bool
    value: Any = None
    error: str = ""
    code: str = ""  # machine-readable: name_in_use, not_found, stale, ...


def _ok(value: Any = None) -> Result:
    return Result(True, value)


def _err(code: str, message: str) -> Result:
    return Result(False, None, message, code)


def expand_jobs(cmd: SubmitRun) -> list[dict[str, Any]]:
    """One job per node of a task (per group), one per initial replica of a service."""
    c = cmd.config
    default_res = c.get("resources") or {}
    out: list[dict[str, Any]] = []
    if c.get("type") == "task":
        groups = c.get("groups")
        if groups:
            for g in groups:
                for _ in range(g.get("nodes") or 1):
                    out.append(
                        {
                            "group": g.get("name"),
                            "resources": g.get("resources") or {},
                            "replica_num": 0,
                        }
                    )
        else:
            for _ in range(c.get("nodes") or 1):
                out.append({"group": None, "resources": default_res, "replica_num": 0})
    elif c.get("type") == "service":
        groups = c.get("groups")
        if groups:
            replica = 0
            for g in groups:
                for _ in range(max(1, (g.get("replicas") or {}).get("min") or 0)):
                    out.append(
                        {
                            "group": g.get("name"),
                            "resources": g.get("resources") or {},
                            "replica_num": replica,
                        }
                    )
                    replica += 1
        else:
            replicas = c.get("replicas") or {"min": 1}
            for r in range(max(1, replicas.get("min") or 0)):
                out.append({"group": None, "resources": default_res, "replica_num": r})
    else:
        out.append({"group": None, "resources": default_res, "replica_num": 0})
    return out


class StateMachine:
    """Nodes, runs and jobs. ``apply(batch)`` for the consensus node; queries for the API."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeRecord] = {}
        self.runs: dict[str, RunRecord] = {}  # by run name (active runs and retained finished ones)
        self.jobs: dict[str, JobRecord] = {}
        # Jobs not yet finished: what queries scan, so cost follows the live load, not history.
        self.active: dict[str, JobRecord] = {}
        self.requests: dict[str, str] = {}  # request_id -> run_name
        self.applied_index = 0
        # Bumped on every change that can free or need capacity: the scheduler's trigger.
        self.demand_version = 0

    # -- consensus interface ------------------------------------------------------------------
    def apply(self, batch: Iterable[tuple[int, bytes]]) -> list[Result]:
        """Apply committed entries ``(index, data)`` in order; one result per entry."""
        results = []
        for index, data in batch:
            self.applied_index = index
            if not data:  # the empty entry a new leader appends
                results.append(_ok())
                continue
            try:
                cmd = decode(data)
            except ValueError as e:
                # A command this build cannot read (a newer peer?) must not stop the applier.
                results.append(_err("undecodable", f"cannot decode command: {e}"))
                continue
            results.append(self.apply_command(cmd))
        return results

    def apply_command(self, cmd: Any) -> Result:
        handler = getattr(self, "_on_" + cmd.kind)
        return handler(cmd)

    def snapshot(self) -> bytes:
        doc = {
            "applied_index": self.applied_index,
            "demand_version": self.demand_version,
            "nodes": [n.model_dump(mode="json") for n in self.nodes.values()],
            "runs": [r.model_dump(mode="json") for r in self.runs.values()],
            "jobs": [j.model_dump(mode="json") for j in self.jobs.values()],
            "requests": self.requests,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def restore(self, data: bytes) -> None:
        doc = json.loads(data) if data else {}
        self.applied_index = doc.get("applied_index", 0)
        self.demand_version = doc.get("demand_version", 0)
        self.nodes = {n["node_id"]: NodeRecord.model_validate(n) for n in doc.get("nodes", [])}
        self.runs = {r["run_name"]: RunRecord.model_validate(r) for r in doc.get("runs", [])}
        self.jobs = {j["job_id"]: JobRecord.model_validate(j) for j in doc.get("jobs", [])}
        self.active = {k: j for k, j in self.jobs.items() if not j.status.is_finished()}
        self.requests = dict(doc.get("requests", {}))

    # -- handlers -----------------------------------------------------------------------------
    def _on_register_node(self, cmd: RegisterNode) -> Result:
        fields = cmd.model_dump(exclude={"kind", "at"})
        existing = self.nodes.get(cmd.node_id)
        node = NodeRecord(**fields, registered_at=existing.registered_at if existing else cmd.at)
        self.nodes[cmd.node_id] = node
        self.demand_version += 1
        return _ok(cmd.node_id)

    def _on_submit_run(self, cmd: SubmitRun) -> Result:
        if cmd.request_id in self.requests:
            return _ok(self.requests[cmd.request_id])  # a retried submission: same run, once
        current = self.runs.get(cmd.run_name)
        if current is not None and not current.status.is_finished():
            return _err(
                "name_in_use", f"run {cmd.run_name!r} is active; stop it or choose another name"
            )
        if current is not None:
            self._forget_run(current)
        run = RunRecord(
            run_id=cmd.run_id,
            run_name=cmd.run_name,
            project=cmd.project,
            user=cmd.user,
            request_id=cmd.request_id,
            config=cmd.config,
            run_args=cmd.run_args,
            code=cmd.code,
            priority=int(cmd.config.get("priority") or 0),
            submitted_at=cmd.at,
        )
        for num, spec in enumerate(expand_jobs(cmd)):
            job = JobRecord(
                job_id=f"{cmd.run_id}-{spec['replica_num']}-{num}-0",
                run_name=cmd.run_name,
                run_id=cmd.run_id,
                job_num=num,
                replica_num=spec["replica_num"],
                group=spec["group"],
                resources=spec["resources"],
                resources_key=json.dumps(spec["resources"], sort_keys=True, separators=(",", ":")),
                submitted_at=cmd.at,
            )
            self.jobs[job.job_id] = job
            self.active[job.job_id] = job
            run.job_ids.append(job.job_id)
        self.runs[run.run_name] = run
        self.requests[cmd.request_id] = run.run_name
        self.demand_version += 1
        return _ok(run.run_name)

    def _on_assign_jobs(self, cmd: AssignJobs) -> Result:
        accepted, refused = [], {}
        taken: dict[str, set[int]] = {}
        for a in cmd.assignments:
            job = self.jobs.get(a.job_id)
            node = self.nodes.get(a.node_id)
            if job is None or job.status is not JobStatus.SUBMITTED:
                refused[a.job_id] = "job is no longer waiting"
                continue
            if node is None or node.status != "active":
                refused[a.job_id] = f"node {a.node_id} is not active"
                continue
            busy = taken.setdefault(a.node_id, self.gpus_in_use(a.node_id))
            indices = set(a.gpu_indices)
            valid = {g.index for g in node.gpus}
            if not indices <= valid or indices & busy or len(indices) != len(a.gpu_indices):
                refused[a.job_id] = "GPUs are not free"  # a stale decision: never double-allocate
                continue
            busy |= indices
            job.status = JobStatus.PROVISIONING
            job.node_id = a.node_id
            job.gpu_indices = sorted(indices)
            job.epoch += 1
            job.assigned_at = cmd.at
            job.why_pending = ""
            accepted.append(a.job_id)
            self._update_run(self.runs[job.run_name], cmd.at)
        return _ok({"accepted": accepted, "refused": refused})

    def _on_set_pending_reasons(self, cmd: SetPendingReasons) -> Result:
        for job_id, why in cmd.reasons.items():
            job = self.jobs.get(job_id)
            if job is not None and job.status is JobStatus.SUBMITTED:
                job.why_pending = why
        return _ok()

    def _fenced(self, job_id: str, epoch: int) -> JobRecord | Result:
        job = self.jobs.get(job_id)
        if job is None:
            return _err("not_found", f"no job {job_id}")
        if epoch != job.epoch:
            return _err(
                "stale", f"job {job_id} was reassigned (epoch {job.epoch}, report from {epoch})"
            )
        return job

    def _on_job_started(self, cmd: JobStarted) -> Result:
        job = self._fenced(cmd.job_id, cmd.epoch)
        if isinstance(job, Result):
            return job
        if job.status in (JobStatus.PROVISIONING, JobStatus.PULLING):
            job.status = JobStatus.RUNNING
            job.started_at = cmd.started_at
            self._update_run(self.runs[job.run_name], cmd.at)
        return _ok()

    def _on_job_finished(self, cmd: JobFinished) -> Result:
        job = self._fenced(cmd.job_id, cmd.epoch)
        if isinstance(job, Result):
            return job
        if job.status.is_finished():
            return _ok()
        reason = cmd.reason
        # A job stopped by the user reports why from the runner's side ("terminated"); keep the
        # user's intent (stop vs abort) as the reason.
        if job.stop_requested == "abort":
            reason = JobTerminationReason.ABORTED_BY_USER
        elif job.stop_requested == "stop" and reason is not JobTerminationReason.DONE_BY_RUNNER:
            reason = JobTerminationReason.TERMINATED_BY_USER
        self._finish_job(job, reason, cmd.at, cmd.exit_code, cmd.message)
        self._update_run(self.runs[job.run_name], cmd.at)
        return _ok()

    def _on_stop_run(self, cmd: StopRun) -> Result:
        run = self.runs.get(cmd.run_name)
        if run is None:
            return _err("not_found", f"no run named {cmd.run_name!r}")
        if run.status.is_finished():
            return _ok(run.run_name)
        run.termination_reason = (
            RunTerminationReason.ABORTED_BY_USER
            if cmd.abort
            else RunTerminationReason.STOPPED_BY_USER
        )
        for job_id in run.job_ids:
            job = self.jobs[job_id]
            if job.status is JobStatus.SUBMITTED:
                reason = (
                    JobTerminationReason.ABORTED_BY_USER
                    if cmd.abort
                    else JobTerminationReason.TERMINATED_BY_USER
                )
                self._finish_job(job, reason, cmd.at, None, "")
            elif job.status.holds_resources():
                # The agent holding it sees this and stops the process (gracefully unless abort).
                job.status = JobStatus.TERMINATING
                job.stop_requested = "abort" if cmd.abort else "stop"
        self._update_run(run, cmd.at)
        return _ok(run.run_name)

    def _on_prune_runs(self, cmd: PruneRuns) -> Result:
        finished = sorted(
            (r for r in self.runs.values() if r.status.is_finished()),
            key=lambda r: (r.finished_at or 0, r.run_name),
            reverse=True,
        )
        gone = [
            r
            for i, r in enumerate(finished)
            if i >= cmd.keep or cmd.at - (r.finished_at or 0) > cmd.max_age_s
        ]
        for r in gone:
            self._forget_run(r)
        return _ok(len(gone))

    # -- helpers ------------------------------------------------------------------------------
    def _forget_run(self, run: RunRecord) -> None:
        for job_id in run.job_ids:
            self.jobs.pop(job_id, None)
            self.active.pop(job_id, None)
        if run.request_id is not None and self.requests.get(run.request_id) == run.run_name:
            del self.requests[run.request_id]
        self.runs.pop(run.run_name, None)

    def _finish_job(
        self,
        job: JobRecord,
        reason: JobTerminationReason,
        at: float,
        exit_code: int | None,
        message: str,
    ) -> None:
        freed = job.status.holds_resources()
        self.active.pop(job.job_id, None)
        job.status = reason.to_status()
        job.termination_reason = reason
        job.termination_message = message
        job.exit_code = exit_code
        job.finished_at = at
        job.stop_requested = None
        if freed:
            self.demand_version += 1

    def _update_run(self, run: RunRecord, at: float) -> None:
        """Derive the run's status from its jobs, in dstack's priority order (§4.1)."""
        jobs = [self.jobs[j] for j in run.job_ids]
        if run.status.is_finished():
            return
        if all(j.status.is_finished() for j in jobs):
            if run.termination_reason is None:
                all_done = all(j.status is JobStatus.DONE for j in jobs)
                run.termination_reason = (
                    RunTerminationReason.ALL_JOBS_DONE
                    if all_done
                    else RunTerminationReason.JOB_FAILED
                )
            run.status = run.termination_reason.to_status()
            run.finished_at = at
            return
        # Any job that ended other than DONE (failed, max_duration, ...) fails the run (dstack).
        ended_badly = any(j.status.is_finished() and j.status is not JobStatus.DONE for j in jobs)
        if run.termination_reason is not None or ended_badly:
            if run.termination_reason is None:
                run.termination_reason = RunTerminationReason.JOB_FAILED
                # One node of a gang failed: the rest of the gang stops too.
                for j in jobs:
                    if j.status.holds_resources() and j.status is not JobStatus.TERMINATING:
                        j.status = JobStatus.TERMINATING
                        j.stop_requested = "stop"
                    elif j.status is JobStatus.SUBMITTED:
                        self._finish_job(j, JobTerminationReason.TERMINATED_BY_SERVER, at, None, "")
                if all(j.status.is_finished() for j in jobs):
                    self._update_run(run, at)
                    return
            run.status = RunStatus.TERMINATING
        elif any(j.status is JobStatus.RUNNING for j in jobs):
            run.status = RunStatus.RUNNING
        elif any(j.status in (JobStatus.PROVISIONING, JobStatus.PULLING) for j in jobs):
            run.status = RunStatus.PROVISIONING
        else:
            run.status = RunStatus.SUBMITTED

    # -- queries ------------------------------------------------------------------------------
    def gpus_in_use(self, node_id: str) -> set[int]:
        return {
            i
            for j in self.active.values()
            if j.node_id == node_id and j.status.holds_resources()
            for i in j.gpu_indices
        }

    def waiting_jobs(self) -> list[JobRecord]:
        return [j for j in self.active.values() if j.status is JobStatus.SUBMITTED]

    def jobs_on_node(self, node_id: str) -> list[JobRecord]:
        """Jobs this node must run or stop (assigned and not finished)."""
        return [
            j for j in self.active.values() if j.node_id == node_id and j.status.holds_resources()
        ]

    def list_runs(self, include_finished: bool = False) -> list[RunRecord]:
        runs = [r for r in self.runs.values() if include_finished or not r.status.is_finished()]
        return sorted(runs, key=lambda r: (r.submitted_at, r.run_name), reverse=True)

    def run_jobs(self, run: RunRecord) -> list[JobRecord]:
        return [self.jobs[j] for j in run.job_ids]
