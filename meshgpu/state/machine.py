"""The replicated state machine: ``apply`` turns committed commands into state, deterministically.

Every member applies the same commands in the same order and must reach the same state, so
``apply`` reads no clock, draws no random numbers and does no I/O; it also never raises for a
command that is merely refused (a name already in use, a stale assignment): it returns a
``Result`` saying so, because the command is already in everyone's log.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from meshgpu.config.spec import SERVICE_INTERRUPTIONS, JobSpec, compile_run
from meshgpu.state.commands import (
    AssignJobs,
    Assignment,
    JobActivity,
    JobFinished,
    JobReports,
    JobStarted,
    PreemptJobs,
    PruneRuns,
    RegisterNode,
    ReplicaProbes,
    ScaleService,
    ScheduleRun,
    SetGPUHealth,
    SetInactivityDuration,
    SetPendingReasons,
    SetRunPriority,
    StopRun,
    SubmitRun,
    TriggerRun,
    UpdateService,
    decode,
)
from meshgpu.state.feed import ChangeFeed
from meshgpu.state.lifecycle import check_job_move, check_run_move
from meshgpu.state.records import (
    JobRecord,
    JobStatus,
    JobTerminationReason,
    NodeRecord,
    ReplicaRetry,
    RunRecord,
    RunStatus,
    RunTerminationReason,
)
from meshgpu.state.retry import decide

_USER_STOPS = (RunTerminationReason.STOPPED_BY_USER, RunTerminationReason.ABORTED_BY_USER)
_PREEMPTIBLE_STATUSES = (JobStatus.PROVISIONING, JobStatus.PULLING, JobStatus.RUNNING)
_STARTING = (JobStatus.PROVISIONING, JobStatus.PULLING)
# What an in-place update of a service may change without redeploying (dstack): the replica
# counts and their scaling, and the priority.
_SCALING_FIELDS = ("replicas", "scaling", "priority")
ROLLING_MAX_SURGE = 1  # dstack's ROLLING_DEPLOYMENT_MAX_SURGE: one replica above desired


def service_group(job: JobRecord) -> str:
    """The replica group of a service's job: its group, or ``"0"`` for a plain service (whose
    jobs have no group, like a task's without ``groups``)."""
    return job.group or "0"


@dataclass(slots=True)
class _Replica:
    """A service replica as scaling and rolling deployments weigh it (dstack's
    ``_get_active_and_inactive_replicas``): its latest jobs, whether it is active (not stopping,
    not finished; a replica being retried counts), and how important it is to keep:
    0 waiting (or being retried), 1 starting, 2 running but not ready, 3 receiving traffic."""

    num: int
    group: str
    jobs: list[JobRecord]
    deployment: int
    active: bool
    importance: int


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
        # Who did what (submit, stop): ``Replicated`` points it at the cluster's audit trail
        # (``meshgpu/state/access.py``); called on apply, in log order.
        self.on_audit: Callable[[float, str, str, str, str], None] | None = None
        # A project's GPU quota (``max_gpus``, None: none): ``Replicated`` points it at the
        # cluster's projects; ``AssignJobs`` re-checks it on apply, in log order.
        self.quota_of: Callable[[str], int | None] | None = None
        # Bumped on every change that can free or need capacity: the scheduler's trigger.
        self.demand_version = 0
        # Bumped on every change to what a service routes to (a replica's readiness, a ready
        # replica's status, a service updated or scaled): the ingress's trigger. Local, never
        # snapshotted (a restore bumps it).
        self.service_version = 0
        # What each apply changed (job, node and run ids), for readers that keep indexes of
        # their own -- the scheduler's wait queue and host index (``feed.py``).
        self.feed = ChangeFeed()
        self._reset_indexes()

    def _reset_indexes(self) -> None:
        """The state's own derived indexes (never snapshotted: ``restore`` rebuilds them): what
        ``apply`` checks assignments against and what the queries answer from."""
        self.held: dict[str, dict[str, JobRecord]] = {}  # node_id -> jobs holding resources there
        self.waiting_count = 0  # SUBMITTED jobs

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
            if cmd.domain != "jobs":  # another domain's entry: ``Replicated`` routes those
                results.append(_err("wrong_domain", f"{cmd.kind} is not a jobs command"))
                continue
            results.append(self.apply_command(cmd))
        return results

    def apply_command(self, cmd: Any) -> Result:
        handler = getattr(self, "_on_" + cmd.kind)
        return handler(cmd)

    def snapshot(self) -> bytes:
        return self.snapshot_view()()

    def snapshot_view(self) -> Callable[[], bytes]:
        """A consistent copy of the state, cheap to take, and a function that encodes it.

        The copy is taken where the state is applied (the Raft owner task); the encoding -- the
        costly part, seconds for a large state -- may then run in a worker thread while the
        state moves on. Records are copied one level deep: below that, applying replaces
        values rather than mutating them. Each record is encoded on its own, so a worker
        thread hands the interpreter back between records (one ``json.dumps`` of the whole
        document would hold it for its whole length)."""
        nodes = [n.model_dump(mode="json", exclude=_node_defaults(n)) for n in self.nodes.values()]
        runs = [_frozen(r) for r in self.runs.values()]
        jobs = [_frozen(j) for j in self.jobs.values()]
        requests = dict(self.requests)
        head = {"applied_index": self.applied_index, "demand_version": self.demand_version}

        def encode() -> bytes:
            return b"".join(
                (
                    json.dumps(head, separators=(",", ":")).encode()[:-1],
                    b',"nodes":',
                    json.dumps(nodes, separators=(",", ":")).encode(),
                    b',"runs":[',
                    b",".join([_run_doc(r) for r in runs]),
                    b'],"jobs":[',
                    ",".join([j.model_dump_json(exclude=_job_defaults(j)) for j in jobs]).encode(),
                    b'],"requests":',
                    json.dumps(requests, separators=(",", ":")).encode(),
                    b"}",
                )
            )

        return encode

    def restore(self, data: bytes) -> None:
        doc = json.loads(data) if data else {}
        self.applied_index = doc.get("applied_index", 0)
        self.nodes = {n["node_id"]: NodeRecord.model_validate(n) for n in doc.get("nodes", [])}
        self.runs = {r["run_name"]: RunRecord.from_doc(r) for r in doc.get("runs", [])}
        self.jobs = {j["job_id"]: JobRecord.model_validate(j) for j in doc.get("jobs", [])}
        self.active = {k: j for k, j in self.jobs.items() if not j.status.is_finished()}
        self.requests = dict(doc.get("requests", {}))
        self._reset_indexes()
        for run in sorted(self.runs.values(), key=lambda r: r.run_name):
            for job_id in run.job_ids:
                self._track(self.jobs[job_id], None)
        # A new epoch of the feed: readers rebuild their indexes from the restored state.
        self.feed.reset()
        # Set last: rebuilding the indexes goes through ``_track``, which counts transitions.
        self.demand_version = doc.get("demand_version", 0)
        self.service_version += 1

    # -- indexes ------------------------------------------------------------------------------
    def _track(self, job: JobRecord, was: JobStatus | None) -> None:
        """Bring the indexes in line with ``job.status`` (call after every status change, with
        the status it had before -- ``_move`` returns it -- or None for a new job) and note the
        job in the change feed.

        Also the scheduler's trigger for job transitions: ``demand_version`` is bumped when a
        job stops waiting without being placed (stopped, aborted, forgotten: the jobs behind
        it may go now, and a plan that placed it is refused), when a placed job is asked to
        stop (capacity is about to come back, what preemption may take changes), and when a
        job lets go of its resources. Every handler changes job status through here, so no
        path can free capacity without waking the scheduler. Only placing a job (the
        scheduler's own decision) does not: it uses capacity up."""
        job_id = job.job_id
        self.feed.job(job_id)
        status = job.status
        if job.ready:
            self.service_version += 1  # a replica that may receive traffic changed status
        if status is JobStatus.SUBMITTED:
            if was is not JobStatus.SUBMITTED:
                self.waiting_count += 1
        elif was is JobStatus.SUBMITTED:
            self.waiting_count -= 1
            if not status.holds_resources():
                self.demand_version += 1
        node = job.node_id
        if node is None:
            return
        holds = status.holds_resources()
        here = self.held.get(node)
        held = here is not None and job_id in here
        if holds or held:
            self._node_changed(node)
        if status is JobStatus.TERMINATING or (held and not holds):
            self.demand_version += 1
        if holds == held:
            return
        if holds:
            self.held.setdefault(node, {})[job_id] = job
        else:
            assert here is not None
            del here[job_id]

    def set_node_status(self, node_id: str, status: str) -> None:
        """Mark a node active, draining or dead (for handlers that decide it, e.g. a host found
        unreachable): the record is replaced and the change noted for the scheduler."""
        node = self.nodes.get(node_id)
        if node is None or node.status == status:
            return
        self.nodes[node_id] = node.model_copy(update={"status": status})
        self._node_changed(node_id)
        self.demand_version += 1

    def forget_node(self, node_id: str) -> None:
        """Drop a node's record (a host taken out of the mesh for good, once its jobs ended:
        ``cluster.ForgetNode``). Finished jobs keep the node id they ran on."""
        if self.nodes.pop(node_id, None) is None:
            return
        self.held.pop(node_id, None)
        self._node_changed(node_id)  # the scheduler's host index drops it
        self.demand_version += 1

    def _node_changed(self, node_id: str) -> None:
        """Note a change to a node's record, status or holdings, or to how the scheduler weighs
        what it holds (every handler that makes one must call this, or readers of the feed miss
        it)."""
        self.feed.node(node_id)

    # -- handlers -----------------------------------------------------------------------------
    def _on_register_node(self, cmd: RegisterNode) -> Result:
        fields = cmd.model_dump(exclude={"kind", "at"})
        existing = self.nodes.get(cmd.node_id)
        node = NodeRecord(**fields, registered_at=existing.registered_at if existing else cmd.at)
        if existing is not None:
            # A host registering again (a restart, back from the dead) does not clear a GPU's
            # fault: it stays unhealthy until the host reports it healthy (SetGPUHealth).
            faulty = {g.uuid: g for g in existing.gpus if not g.healthy}
            if faulty:
                node.gpus = [
                    g.model_copy(update={"healthy": False, "health_reason": bad.health_reason})
                    if g.healthy and (bad := faulty.get(g.uuid)) is not None
                    else g
                    for g in node.gpus
                ]
        self.nodes[cmd.node_id] = node
        self._node_changed(cmd.node_id)
        self.demand_version += 1
        return _ok(cmd.node_id)

    def _on_set_gpu_health(self, cmd: SetGPUHealth) -> Result:
        node = self.nodes.get(cmd.node_id)
        if node is None:
            return _err("not_found", f"no node {cmd.node_id}")
        verdicts = {h.index: h for h in cmd.gpus}
        gpus = []
        changed = []
        for g in node.gpus:
            h = verdicts.get(g.index)
            reason = "" if h is None or h.healthy else h.reason
            if h is None or (g.healthy, g.health_reason) == (h.healthy, reason):
                gpus.append(g)
                continue
            gpus.append(g.model_copy(update={"healthy": h.healthy, "health_reason": reason}))
            changed.append(g.index)
        if changed:
            # A new record (the scheduler's index notices the object changed) in the feed.
            self.nodes[cmd.node_id] = node.model_copy(update={"gpus": gpus})
            self._node_changed(cmd.node_id)
            self.demand_version += 1
        return _ok(changed)

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
        if self.on_audit is not None:
            self.on_audit(cmd.at, "submit", cmd.user, cmd.project, cmd.run_name)
        run = RunRecord.create(
            cmd.config,
            run_id=cmd.run_id,
            run_name=cmd.run_name,
            project=cmd.project,
            user=cmd.user,
            request_id=cmd.request_id,
            run_args=cmd.run_args,
            code=cmd.code,
            submitted_at=cmd.at,
        )
        run.priority = run.spec.priority
        self.runs[run.run_name] = run
        self.requests[cmd.request_id] = run.run_name
        if run.spec.schedule:
            # dstack: a scheduled run is PENDING until its next start (``TriggerRun``).
            run.waiting_since = cmd.at
            run.next_triggered_at = cmd.next_triggered_at
            self._move_run(run, RunStatus.PENDING)
            self.feed.run(run.run_name)
            return _ok(run.run_name)
        self._start_jobs(run, cmd.at)
        return _ok(run.run_name)

    def _start_jobs(self, run: RunRecord, at: float) -> None:
        """Queue the run's jobs: at its submission, or at each start of a scheduled run (a new
        submission of each job then). A service starts each replica group at its ``min``."""
        service = run.spec.service
        if service is not None:
            # Each replica group starts at its ``min`` (0: scaled to zero until asked for).
            for g in service.groups:
                run.desired_replicas[g.name] = g.min
                run.last_scaled_at[g.name] = at
                self._add_replicas(run, g.name, g.min, at)
            self.service_version += 1
            self._update_run(run, at)
            return
        # A scheduled run's later cycles: each job a new submission of the last cycle's (job ids
        # are never reused: hosts key their files by them).
        last = {
            (j.replica_num, j.job_num): j.submission_num
            for j in (self.jobs[i] for i in run.replaced_job_ids if i in self.jobs)
        }
        for spec in run.spec.jobs:
            sub = last.get((spec.replica_num, spec.job_num), -1) + 1
            while f"{run.run_id}-{spec.replica_num}-{spec.job_num}-{sub}" in self.jobs:
                sub += 1
            job = JobRecord(
                job_id=f"{run.run_id}-{spec.replica_num}-{spec.job_num}-{sub}",
                run_name=run.run_name,
                run_id=run.run_id,
                job_num=spec.job_num,
                replica_num=spec.replica_num,
                submission_num=sub,
                group=spec.group,
                resources=spec.resources,
                resources_key=spec.resources_key,
                submitted_at=at,
            )
            self.jobs[job.job_id] = job
            self.active[job.job_id] = job
            self._track(job, None)
            run.job_ids.append(job.job_id)
        self.demand_version += 1
        if run.status is not RunStatus.SUBMITTED:
            self._update_run(run, at)

    # -- scheduled runs (dstack's ``schedule``) -----------------------------------------------
    def _on_schedule_run(self, cmd: ScheduleRun) -> Result:
        run = self.runs.get(cmd.run_name)
        if run is None:
            return _err("not_found", f"no run named {cmd.run_name!r}")
        if not run.awaiting_trigger or run.waiting_since != cmd.waiting_since:
            return _err("stale", f"run {cmd.run_name!r} does not wait to be scheduled")
        if run.next_triggered_at is None:
            run.next_triggered_at = cmd.next_triggered_at
            self.feed.run(run.run_name)
        return _ok(run.next_triggered_at)

    def _on_trigger_run(self, cmd: TriggerRun) -> Result:
        run = self.runs.get(cmd.run_name)
        if run is None:
            return _err("not_found", f"no run named {cmd.run_name!r}")
        if not run.awaiting_trigger or run.next_triggered_at != cmd.triggered_at:
            # Already fired (a repeat after a failover), re-armed for another time, or stopped.
            return _err("stale", f"run {cmd.run_name!r} does not wait for this start")
        # Keep the last cycle's jobs (their logs, ``ps``) until this one; forget older ones.
        for job_id in run.replaced_job_ids:
            self.jobs.pop(job_id, None)
            self.active.pop(job_id, None)
        run.replaced_job_ids = []
        if run.spec.service is None:
            run.replaced_job_ids, run.job_ids = run.job_ids, []
        # (a service's replicas take the places of the last cycle's: ``_add_replicas``)
        run.waiting_since = None
        run.next_triggered_at = None
        run.last_triggered_at = cmd.triggered_at
        self.feed.run(run.run_name)
        self._start_jobs(run, cmd.at)
        return _ok(run.run_name)

    def _rearm(self, run: RunRecord, at: float) -> None:
        """A scheduled run's cycle ended (not stopped by the user): it waits for its next start
        (dstack: back to PENDING); the leader arms it (``ScheduleRun``)."""
        run.termination_reason = None
        run.retrying.clear()
        run.waiting_since = at
        run.next_triggered_at = None
        self._move_run(run, RunStatus.PENDING)
        self.feed.run(run.run_name)

    def _on_assign_jobs(self, cmd: AssignJobs) -> Result:
        accepted: list[str] = []
        refused: dict[str, str] = {}
        gangs: dict[tuple[str, int], list[tuple[Assignment, JobRecord]]] = {}
        for a in cmd.assignments:
            job = self.jobs.get(a.job_id)
            if job is None or job.status is not JobStatus.SUBMITTED:
                refused[a.job_id] = "job is no longer waiting"
                continue
            gangs.setdefault((job.run_name, job.replica_num), []).append((a, job))
        for key, members in gangs.items():
            # Checked against the state as it stands, which already holds the gangs accepted
            # before this one in the same command.
            why = self._check_gang(key, members)
            if why:
                for a, _ in members:
                    refused[a.job_id] = why
                # A stale decision: the gang still waits, and what the plan meant for it (and
                # for the jobs behind it) did not happen. Plan again on the state as it stands.
                self.demand_version += 1
                continue
            for a, job in members:
                was = self._move(job, JobStatus.PROVISIONING)
                job.node_id = a.node_id
                job.gpu_indices = sorted(a.gpu_indices)
                job.blocks = a.blocks
                job.epoch += 1
                job.assigned_at = cmd.at
                job.why_pending = ""
                self._track(job, was)
                accepted.append(a.job_id)
            self._update_run(self.runs[key[0]], cmd.at)
        self._set_pending_reasons(cmd.pending_reasons)
        return _ok({"accepted": accepted, "refused": refused})

    def _check_gang(self, key: tuple[str, int], members: list[tuple[Assignment, JobRecord]]) -> str:
        """Why this gang's assignments cannot all be accepted ('' if they can)."""
        run = self.runs.get(key[0])
        jobs = self.jobs
        waiting = {
            j
            for j in (run.job_ids if run is not None else ())
            if jobs[j].status is JobStatus.SUBMITTED and jobs[j].replica_num == key[1]
        }
        given = {a.job_id for a, _ in members}
        if len(given) != len(members) or given != waiting:
            return (
                f"a gang starts whole: {len(given)} of its {len(waiting)} waiting jobs were "
                "assigned"
            )
        gpus: dict[str, set[int]] = {}
        blocks: dict[str, int] = {}
        for a, _ in members:
            node = self.nodes.get(a.node_id)
            if node is None or node.status != "active":
                return f"node {a.node_id} is not active"
            indices = set(a.gpu_indices)
            healthy = {g.index for g in node.gpus if g.healthy}
            busy = self.gpus_in_use(a.node_id)
            mine = gpus.setdefault(a.node_id, set())
            if (
                len(indices) != len(a.gpu_indices)
                or not indices <= healthy
                or indices & busy
                or indices & mine
            ):
                return "GPUs are not free"  # a stale decision: never double-allocate
            mine |= indices
            total = node.block_count()
            if total is not None:
                used = self.blocks_in_use(a.node_id) + blocks.get(a.node_id, 0)
                if a.blocks < 1 or used + a.blocks > total:
                    return f"blocks of {node.name} are not free"
                blocks[a.node_id] = blocks.get(a.node_id, 0) + a.blocks
            elif a.blocks:
                return f"{node.name} is not split into blocks"
        if run is not None and self.quota_of is not None:
            why = self._over_quota(run.project, sum(len(a.gpu_indices) for a, _ in members))
            if why:
                return why
        group = jobs[members[0][0].job_id].group if members else None
        if run is not None and run.spec.host_ports and not run.spec.image_of(group):
            return self._ports_taken(run, [a.node_id for a, _ in members])
        return ""

    def _over_quota(self, project: str, gpus: int) -> str:
        """Why ``gpus`` more GPUs would take ``project`` over its quota ('' if they would not).
        Costs a scan of the active jobs, only for a project that has a quota."""
        assert self.quota_of is not None
        quota = self.quota_of(project) if gpus else None
        if quota is None:
            return ""
        runs = self.runs
        held = 0
        for j in self.active.values():
            if j.gpu_indices and j.node_id is not None and j.status.holds_resources():
                r = runs.get(j.run_name)
                if r is not None and r.project == project:
                    held += len(j.gpu_indices)
        if held + gpus <= quota:
            return ""
        return f"project {project} uses {held} of its {quota} GPUs (max_gpus)"

    def _ports_taken(self, run: RunRecord, node_ids: list[str]) -> str:
        """Why a process job of ``run`` cannot listen on its host ports on these nodes (''
        if it can): a job holding one of them runs on a host with the same internal IP (or
        the gang would put two of its jobs on one IP)."""
        ports = set(run.spec.host_ports)
        seen: set[str] = set()
        for node_id in node_ids:
            ip = self.nodes[node_id].internal_ip
            if ip in seen:
                return f"port {min(ports)} is in use on {ip} by run {run.run_name}"
            seen.add(ip)
            for other in sorted(self.nodes):
                if self.nodes[other].internal_ip != ip:
                    continue
                for job in self.held.get(other, {}).values():
                    holder = self.runs.get(job.run_name)
                    if holder is None or holder.spec.image_of(job.group):
                        continue
                    both = ports.intersection(holder.spec.host_ports)
                    if both:
                        return f"port {min(both)} is in use on {ip} by run {holder.run_name}"
        return ""

    def _on_set_pending_reasons(self, cmd: SetPendingReasons) -> Result:
        self._set_pending_reasons(cmd.reasons)
        return _ok()

    def _set_pending_reasons(self, reasons: dict[str, str]) -> None:
        for job_id, why in reasons.items():
            job = self.jobs.get(job_id)
            if job is not None and job.status is JobStatus.SUBMITTED:
                job.why_pending = why

    def _on_preempt_jobs(self, cmd: PreemptJobs) -> Result:
        preempted: list[str] = []
        skipped: dict[str, str] = {}
        for p in cmd.preemptions:
            by = self.runs.get(p.by_run)
            if by is None or not any(
                self.jobs[j].status is JobStatus.SUBMITTED for j in by.job_ids
            ):
                skipped.update(dict.fromkeys(p.job_ids, f"run {p.by_run} no longer waits"))
                continue
            for job_id in p.job_ids:
                job = self.jobs.get(job_id)
                if job is None or job.status not in _PREEMPTIBLE_STATUSES:
                    skipped[job_id] = "job no longer runs"
                    continue
                run = self.runs[job.run_name]
                if run.priority >= by.priority:
                    skipped[job_id] = f"run {p.by_run} does not outrank run {run.run_name}"
                    continue
                # A gang that lost a member is useless: the whole replica stops.
                for other in self.run_jobs(run):
                    if (
                        other.replica_num == job.replica_num
                        and other.status in _PREEMPTIBLE_STATUSES
                    ):
                        was = self._move(other, JobStatus.TERMINATING)
                        other.stop_requested = "server"  # the graceful stop (stop_duration)
                        other.preempted_by = by.run_name
                        other.termination_message = p.message
                        self._track(other, was)
                        preempted.append(other.job_id)
                # An interruption: resubmitted once stopped if the run's retry covers it.
                self._replica_failed(run, job, "interruption", cmd.at, p.message, preempted=True)
                self._update_run(run, cmd.at)
        if preempted:
            self.demand_version += 1
        return _ok({"preempted": preempted, "skipped": skipped})

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
            was = self._move(job, JobStatus.RUNNING)
            job.started_at = cmd.started_at
            job.working_dir = cmd.working_dir
            job.job_user = cmd.user
            job.limits = cmd.limits
            self._track(job, was)
            self._update_run(self.runs[job.run_name], cmd.at)
        return _ok()

    def _on_job_finished(self, cmd: JobFinished) -> Result:
        job = self._fenced(cmd.job_id, cmd.epoch)
        if isinstance(job, Result):
            return job
        if job.status.is_finished():
            return _ok()
        reason = cmd.reason
        # A job told to stop reports why from the runner's side ("terminated", or the exit code
        # of a SIGTERM); keep the intent as the reason: the user's (stop vs abort) first, then
        # the scheduler's (preempted), then meshgpu's own. A job that finished anyway is done.
        if job.stop_requested == "abort":
            reason = JobTerminationReason.ABORTED_BY_USER
        elif reason is not JobTerminationReason.DONE_BY_RUNNER:
            if job.stop_requested == "stop":
                reason = JobTerminationReason.TERMINATED_BY_USER
            elif job.stop_requested == "scale":
                reason = JobTerminationReason.SCALED_DOWN
            elif job.preempted_by is not None:
                reason = JobTerminationReason.PREEMPTED
            elif job.stop_requested == "server":
                reason = JobTerminationReason.TERMINATED_BY_SERVER
        message = cmd.message or (job.termination_message if job.preempted_by else "")
        self._finish_job(job, reason, cmd.at, cmd.exit_code, message)
        self._job_ended(job, cmd.at)
        return _ok()

    def _on_job_reports(self, cmd: JobReports) -> Result:
        results = [self.apply_command(r) for r in cmd.reports]
        return _ok([{"ok": r.ok, "code": r.code} for r in results])

    def fail_node_jobs(
        self, node_id: str, reason: JobTerminationReason, at: float, message: str = ""
    ) -> list[str]:
        """End every job the node holds with ``reason`` (its host is gone, so nobody else will
        report them); each run then goes on as for any other failure -- the replica resubmitted
        if the run's ``retry`` covers the event, the run failed otherwise. For handlers of
        commands that decide a host is lost (``cluster.NodeUnreachable``)."""
        ended = []
        for job in self.jobs_on_node(node_id):
            if job.status.is_finished():
                continue
            self._finish_job(job, reason, at, None, message)
            self._job_ended(job, at)
            ended.append(job.job_id)
        return ended

    def _on_stop_run(self, cmd: StopRun) -> Result:
        run = self.runs.get(cmd.run_name)
        if run is None:
            return _err("not_found", f"no run named {cmd.run_name!r}")
        if run.status.is_finished():
            return _ok(run.run_name)
        if self.on_audit is not None:
            action = "abort" if cmd.abort else "stop"
            self.on_audit(cmd.at, action, cmd.by or run.user, run.project, run.run_name)
        # An abort may follow a stop (it cuts the grace period short); a stop never softens
        # an abort.
        abort = cmd.abort or run.termination_reason is RunTerminationReason.ABORTED_BY_USER
        run.termination_reason = (
            RunTerminationReason.ABORTED_BY_USER if abort else RunTerminationReason.STOPPED_BY_USER
        )
        run.retrying.clear()
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
                was = self._move(job, JobStatus.TERMINATING)
                job.stop_requested = "abort" if abort or job.stop_requested == "abort" else "stop"
                self._track(job, was)
        self._update_run(run, cmd.at)
        return _ok(run.run_name)

    def _on_set_run_priority(self, cmd: SetRunPriority) -> Result:
        run = self.runs.get(cmd.run_name)
        if run is None:
            return _err("not_found", f"no run named {cmd.run_name!r}")
        if run.status.is_finished() or run.termination_reason is not None:
            return _err("finished", f"run {cmd.run_name!r} has finished or is stopping")
        if run.priority == cmd.priority:
            return _ok(run.priority)
        run.priority = cmd.priority
        run.set_config({**run.config, "priority": cmd.priority})
        self._run_reweighed(run)
        return _ok(run.priority)

    def _on_set_inactivity_duration(self, cmd: SetInactivityDuration) -> Result:
        run = self.runs.get(cmd.run_name)
        if run is None:
            return _err("not_found", f"no run named {cmd.run_name!r}")
        if run.spec.type != "dev-environment":
            return _err(
                "not_a_dev_environment",
                f"run {cmd.run_name!r} is a {run.spec.type}: inactivity_duration is a dev "
                "environment's",
            )
        if run.status.is_finished() or run.termination_reason is not None:
            return _err("finished", f"run {cmd.run_name!r} has finished or is stopping")
        config = run.config
        if config.get("inactivity_duration") != cmd.inactivity_duration:
            run.set_config({**config, "inactivity_duration": cmd.inactivity_duration})
        return _ok(run.spec.inactivity_duration_s)

    def _on_job_activity(self, cmd: JobActivity) -> Result:
        """Who is attached to which job, as its host reports it (see ``JobActivity``)."""
        results: list[dict[str, Any]] = []
        for report in cmd.reports:
            job = self._fenced(report.job_id, report.epoch)
            if isinstance(job, Result):
                results.append({"ok": False, "code": job.code})
                continue
            if job.status.is_finished():
                results.append({"ok": False, "code": "finished"})
                continue
            job.sessions = report.sessions
            job.inactive_since = report.inactive_since
            results.append({"ok": True, "code": ""})
        return _ok(results)

    # -- services: scaling, readiness, in-place updates ---------------------------------------
    def _service_run(self, run_name: str) -> RunRecord | Result:
        run = self.runs.get(run_name)
        if run is None:
            return _err("not_found", f"no run named {run_name!r}")
        if run.spec.service is None:
            return _err("not_a_service", f"run {run_name!r} is a {run.spec.type}, not a service")
        if run.status.is_finished() or run.termination_reason is not None:
            return _err("finished", f"run {run_name!r} has finished or is stopping")
        if run.awaiting_trigger:
            return _err(
                "scheduled",
                f"run {run_name!r} waits for its next scheduled start; change it once it has "
                "started, or stop it and apply the new configuration",
            )
        return run

    def _on_scale_service(self, cmd: ScaleService) -> Result:
        run = self._service_run(cmd.run_name)
        if isinstance(run, Result):
            return run
        assert run.spec.service is not None
        group = run.spec.service.group(cmd.group)
        if group is None:
            names = ", ".join(g.name for g in run.spec.service.groups)
            return _err(
                "not_found", f"run {cmd.run_name!r} has no replica group {cmd.group!r} ({names})"
            )
        n = min(max(cmd.replicas, group.min), group.max)
        changed = n != run.desired_replicas.get(group.name, group.min)
        if changed:
            run.desired_replicas[group.name] = n
            run.last_scaled_at[group.name] = cmd.at
            self._scale_group(run, group.name, n, cmd.at)
            self.service_version += 1
            self._reconcile_service(run, cmd.at)
            self._update_run(run, cmd.at)
        return _ok({"group": group.name, "replicas": n, "changed": changed})

    def _on_replica_probes(self, cmd: ReplicaProbes) -> Result:
        results: list[dict[str, Any]] = []
        changed_runs: dict[str, None] = {}
        for report in cmd.reports:
            job = self._fenced(report.job_id, report.epoch)
            if isinstance(job, Result):
                results.append({"ok": False, "code": job.code})
                continue
            if job.status is not JobStatus.RUNNING:
                # Readiness is only news while the replica runs on that assignment.
                results.append({"ok": False, "code": "not_running"})
                continue
            results.append({"ok": True, "code": ""})
            probes = list(report.probes)
            if job.ready == report.ready and job.probes == probes:
                continue
            if job.ready != report.ready:
                changed_runs[job.run_name] = None
            job.ready = report.ready
            job.probes = probes
            self.feed.job(job.job_id)
            self.service_version += 1
        for name in changed_runs:
            run = self.runs.get(name)
            if run is not None:
                self._reconcile_service(run, cmd.at)
                self._update_run(run, cmd.at)
        return _ok(results)

    def _on_update_service(self, cmd: UpdateService) -> Result:
        run = self._service_run(cmd.run_name)
        if isinstance(run, Result):
            return run
        try:
            spec = compile_run(cmd.config)
        except (KeyError, TypeError, ValueError) as e:
            return _err("invalid", f"cannot compile the new configuration: {e}")
        if spec.service is None:
            return _err(
                "not_a_service", f"run {cmd.run_name!r} is a service; the update is a {spec.type}"
            )
        old_config = run.config
        code_changed = cmd.code is not None and (
            run.code is None or run.code.sha256 != cmd.code.sha256
        )
        redeploy = (
            code_changed
            or cmd.run_args != run.run_args
            or _without_scaling(cmd.config) != _without_scaling(old_config)
        )
        changed = [
            k
            for k in sorted(set(old_config) | set(cmd.config))
            if old_config.get(k) != cmd.config.get(k)
        ]
        if code_changed:
            changed.append("code")
        if cmd.run_args != run.run_args:
            changed.append("run_args")
        if not changed:
            return _ok({"redeploy": False, "changed": [], "deployment_num": run.deployment_num})
        old_groups = {g.name for g in run.spec.service.groups} if run.spec.service else set()
        run.set_config(cmd.config)
        if redeploy:
            run.deployment_num += 1
            run.run_args = list(cmd.run_args)
            if cmd.code is not None:
                run.code = cmd.code
        if spec.priority != run.priority:
            run.priority = spec.priority
            self._run_reweighed(run)
        self.feed.run(run.run_name)  # its waiting gangs may belong to another class now
        desired: dict[str, int] = {}
        for g in spec.service.groups:
            now = run.desired_replicas.get(g.name, g.min) if g.name in old_groups else g.min
            desired[g.name] = n = min(max(now, g.min), g.max)
            if g.name not in old_groups or n != run.desired_replicas.get(g.name):
                run.last_scaled_at[g.name] = cmd.at
        for name in list(run.last_scaled_at):
            if name not in desired:
                del run.last_scaled_at[name]  # a removed group: the rollout scales it to zero
        run.desired_replicas = desired
        if not redeploy:
            for name, n in desired.items():
                self._scale_group(run, name, n, cmd.at)
        self._reconcile_service(run, cmd.at)
        self.service_version += 1
        self.demand_version += 1
        self._update_run(run, cmd.at)
        return _ok({"redeploy": redeploy, "changed": changed, "deployment_num": run.deployment_num})

    def _run_reweighed(self, run: RunRecord) -> None:
        """The run's priority changed: its waiting gangs move in the queue, preemption weighs
        its running jobs anew."""
        self.feed.run(run.run_name)
        for node_id in sorted(
            {j.node_id for j in self.run_jobs(run) if j.node_id and j.status.holds_resources()}
        ):
            self._node_changed(node_id)
        self.demand_version += 1

    def _replicas(self, run: RunRecord) -> dict[int, _Replica]:
        """The run's replicas (latest jobs), by replica number."""
        by_num: dict[int, list[JobRecord]] = {}
        for job_id in run.job_ids:
            job = self.jobs[job_id]
            by_num.setdefault(job.replica_num, []).append(job)
        retrying = {r.replica_num for r in run.retrying}
        out = {}
        for num in sorted(by_num):
            jobs = sorted(by_num[num], key=lambda j: j.job_num)
            statuses = {j.status for j in jobs}
            active, importance = True, 0
            if num in retrying:
                pass
            elif JobStatus.TERMINATING in statuses or any(s.is_finished() for s in statuses):
                active = False
            elif JobStatus.SUBMITTED in statuses:
                pass
            elif statuses & set(_STARTING):
                importance = 1
            elif not jobs[0].ready:
                importance = 2
            else:
                importance = 3
            out[num] = _Replica(
                num, service_group(jobs[0]), jobs, jobs[0].deployment_num, active, importance
            )
        return out

    def _templates(self, run: RunRecord, group: str) -> list[JobSpec]:
        """The jobs a new replica of ``group`` is made of (those of the group's first replica in
        the compiled spec: its resources and commands)."""
        mine = [j for j in run.spec.jobs if (j.group or "0") == group]
        return [j for j in mine if j.replica_num == mine[0].replica_num] if mine else []

    def _add_replicas(self, run: RunRecord, group: str, count: int, at: float) -> None:
        """Queue ``count`` new replicas of ``group`` at the run's deployment, on the lowest
        replica numbers free (whose jobs have all finished) first, then new ones (dstack)."""
        if count <= 0:
            return
        templates = self._templates(run, group)
        if not templates:
            return
        replicas = self._replicas(run)
        free = [
            n
            for n, r in replicas.items()
            if not r.active and all(j.status.is_finished() for j in r.jobs)
        ]
        nxt = max(replicas, default=-1) + 1
        latest = {(j.replica_num, j.job_num): i for i, j in enumerate(self.run_jobs(run))}
        for _ in range(count):
            if free:
                num = free.pop(0)
            else:
                num, nxt = nxt, nxt + 1
            for t in templates:
                at_index = latest.get((num, t.job_num))
                old = self.jobs[run.job_ids[at_index]] if at_index is not None else None
                sub = old.submission_num + 1 if old is not None else 0
                while f"{run.run_id}-{num}-{t.job_num}-{sub}" in self.jobs:
                    sub += 1
                job = JobRecord(
                    job_id=f"{run.run_id}-{num}-{t.job_num}-{sub}",
                    run_name=run.run_name,
                    run_id=run.run_id,
                    job_num=t.job_num,
                    replica_num=num,
                    submission_num=sub,
                    group=t.group,
                    resources=t.resources,  # type: ignore[arg-type]
                    resources_key=t.resources_key,
                    submitted_at=at,
                    deployment_num=run.deployment_num,
                )
                self.jobs[job.job_id] = job
                self.active[job.job_id] = job
                if old is not None and at_index is not None:
                    run.job_ids[at_index] = job.job_id
                    run.replaced_job_ids.append(old.job_id)
                else:
                    run.job_ids.append(job.job_id)
                self._track(job, None)
        self.demand_version += 1

    def _stop_replica(self, run: RunRecord, replica: _Replica, at: float) -> None:
        """Stop a replica because of scaling or a rolling update (``scaled_down``): waiting jobs
        end at once, placed ones stop gracefully (their host drains them first). Never a
        failure of the run, never retried."""
        retry = self._retry_of(run, replica.num)
        if retry is not None:
            run.retrying.remove(retry)
        for job in replica.jobs:
            if job.status is JobStatus.SUBMITTED:
                self._finish_job(job, JobTerminationReason.SCALED_DOWN, at, None, "")
            elif job.status.holds_resources():
                was = job.status
                if job.status is not JobStatus.TERMINATING:
                    was = self._move(job, JobStatus.TERMINATING)
                if job.stop_requested not in ("stop", "abort"):
                    job.stop_requested = "scale"
                self._track(job, was)
        self.service_version += 1

    def _scale_group(self, run: RunRecord, group: str, n: int, at: float) -> None:
        """Bring the group's active replicas to ``n`` (dstack's ``scale_run_replicas``): new ones
        queued, or the least important stopped: an earlier deployment's first, then waiting,
        starting, not ready, ready; the highest replica number first among equals."""
        active = [r for r in self._replicas(run).values() if r.group == group and r.active]
        diff = n - len(active)
        if diff > 0:
            self._add_replicas(run, group, diff, at)
        elif diff < 0:
            order = sorted(
                active, key=lambda r: (r.deployment >= run.deployment_num, r.importance, -r.num)
            )
            for r in order[:-diff]:
                self._stop_replica(run, r, at)

    def _reconcile_service(self, run: RunRecord, at: float) -> None:
        """Move a service's rolling deployment on (after every event that can change it: a
        replica's readiness, a job's end, a scale, an update). Per group, dstack's
        ``_build_rolling_deployment_maps`` with a surge of one: new-deployment replicas are
        queued while the group has fewer than desired of them and fewer than desired + 1
        active in all; old-deployment replicas not receiving traffic are stopped, and those
        receiving it once enough others receive it (so the count receiving traffic stays at
        most desired, and never drops to none while old ones serve). Replicas of removed
        groups are stopped."""
        service = run.spec.service
        if service is None or run.termination_reason is not None or run.status.is_finished():
            return
        groups = {g.name: g for g in service.groups}
        for _ in range(8):  # a step can enable the next one (stopped old -> room for new)
            replicas = self._replicas(run)
            acted = False
            for r in replicas.values():
                if r.active and r.group not in groups:
                    self._stop_replica(run, r, at)
                    acted = True
            for g in service.groups:
                mine = [r for r in replicas.values() if r.group == g.name]
                acted = self._roll_group(run, g.name, g.min, mine, at) or acted
            if not acted:
                return

    def _roll_group(
        self, run: RunRecord, group: str, low: int, mine: list[_Replica], at: float
    ) -> bool:
        if not any(r.deployment < run.deployment_num for r in mine):
            return False  # no rollout in this group
        desired = run.desired_replicas.get(group, low)
        active = [r for r in mine if r.active]
        new = [r for r in active if r.deployment >= run.deployment_num]
        old = [r for r in active if r.deployment < run.deployment_num]
        start = min(desired - len(new), desired + ROLLING_MAX_SURGE - len(active))
        if start > 0:
            self._add_replicas(run, group, start, at)
            return True
        stop = [r for r in old if r.importance < 3]
        serving_old = sorted((r for r in old if r.importance == 3), key=lambda r: -r.num)
        excess = len(serving_old) + sum(r.importance == 3 for r in new) - desired
        stop.extend(serving_old[: max(excess, 0)])
        for r in stop:
            self._stop_replica(run, r, at)
        return bool(stop)

    def _update_service_run(self, run: RunRecord, jobs: list[JobRecord]) -> None:
        """A service's status while it is not being stopped: it never finishes by itself (its
        replica count may be zero: scaled to zero, it is still up and RUNNING); once up it
        stays RUNNING through scaling and rolling updates."""
        live = [j for j in jobs if not j.status.is_finished()]
        if any(j.status is JobStatus.RUNNING for j in live):
            status = RunStatus.RUNNING
        elif run.retrying and not any(j.status in _STARTING for j in live):
            status = RunStatus.PENDING  # its replicas are stopping to be resubmitted (dstack)
        elif run.status is RunStatus.RUNNING or not live:
            status = RunStatus.RUNNING
        elif any(j.status in _STARTING for j in live):
            status = RunStatus.PROVISIONING
        else:
            status = RunStatus.SUBMITTED
        if status is not run.status:
            self._move_run(run, status)

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
        for job_id in [*run.job_ids, *run.replaced_job_ids]:
            job = self.jobs.pop(job_id, None)
            self.active.pop(job_id, None)
            if job is not None and not job.status.is_finished():
                was = self._move(job, JobStatus.TERMINATED)  # forgotten: out of every index
                self._track(job, was)
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
        self.active.pop(job.job_id, None)
        was = self._move(job, reason.to_status())
        job.termination_reason = reason
        job.termination_message = message
        job.exit_code = exit_code
        job.finished_at = at
        job.stop_requested = None
        self._track(job, was)  # wakes the scheduler: the job let go of its place or its resources

    @staticmethod
    def _move(job: JobRecord, status: JobStatus) -> JobStatus:
        """Every job status change: checked against the job lifecycle (``lifecycle.py``); the
        caller then brings the indexes in line (``_track``, with the status returned: the one
        the job had)."""
        was = job.status
        check_job_move(job.job_id, was, status)
        job.status = status
        return was

    @staticmethod
    def _move_run(run: RunRecord, status: RunStatus) -> None:
        check_run_move(run.run_name, run.status, status)
        run.status = status

    # -- run policies: retry, stop criteria ---------------------------------------------------
    def _job_ended(self, job: JobRecord, at: float) -> None:
        """What a job's end means for its run. Unless the run is already ending or the job's
        replica is already being resubmitted (then the end was asked for), it is news: a master
        done under ``stop_criteria: master-done`` ends the run; a failure resubmits the replica
        or fails the run (``retry``)."""
        run = self.runs[job.run_name]
        if (
            run.termination_reason is None
            and self._retry_of(run, job.replica_num) is None
            # A replica stopped by scaling (or replaced by a rolling update) was asked to end.
            and job.termination_reason is not JobTerminationReason.SCALED_DOWN
        ):
            reason = job.termination_reason
            if job.status is JobStatus.DONE:
                if job.job_num == 0 and run.spec.stop_criteria == "master-done":
                    self._end_run(run, RunTerminationReason.ALL_JOBS_DONE, at)
            elif reason is not None:
                exit_code = f" (exit {job.exit_code})" if job.exit_code is not None else ""
                self._replica_failed(
                    run,
                    job,
                    reason.to_retry_event(),
                    at,
                    f"job {job.job_num} ended {reason.value}{exit_code}",
                )
        self._resubmit_if_stopped(run, job.replica_num, at)
        self._reconcile_service(run, at)
        self._update_run(run, at)

    def _replica_failed(
        self,
        run: RunRecord,
        failed: JobRecord,
        event: str | None,
        at: float,
        message: str,
        preempted: bool = False,
    ) -> None:
        """A job of the replica failed (or is being preempted): stop the whole replica to
        resubmit it, if the run's ``retry`` covers ``event``; otherwise the run fails.

        A service keeps its replica count through interruptions whatever its ``retry`` says: a
        replica whose host was lost (or that was preempted) did nothing wrong, and a service
        is a standing promise to serve, so it is replaced (for up to an hour of interruptions in
        a row, as ``retry: true`` would). Its own failures (an error exit) follow ``retry``."""
        policy = run.spec.retry
        if (
            run.spec.service is not None
            and event == "interruption"
            and (policy is None or event not in policy.events)
        ):
            policy = SERVICE_INTERRUPTIONS
        verdict = decide(policy, failed, event, at, message, preempted=preempted)
        if isinstance(verdict, RunTerminationReason):
            self._end_run(run, verdict, at)
            return
        run.retrying.append(verdict)
        for job in self.run_jobs(run):
            if job.replica_num == failed.replica_num:
                self._stop_job(job, at)
        self._resubmit_if_stopped(run, failed.replica_num, at)

    def _end_run(self, run: RunRecord, reason: RunTerminationReason, at: float) -> None:
        """Decide how the run ends and stop what is left of it (the run finishes when its last
        job has stopped)."""
        run.termination_reason = reason
        run.retrying.clear()
        for job in self.run_jobs(run):
            self._stop_job(job, at)

    def _stop_job(self, job: JobRecord, at: float) -> None:
        """meshgpu's own stop: a waiting job ends at once, a placed one stops gracefully."""
        if job.status is JobStatus.SUBMITTED:
            self._finish_job(job, JobTerminationReason.TERMINATED_BY_SERVER, at, None, "")
        elif job.status.holds_resources() and job.status is not JobStatus.TERMINATING:
            was = self._move(job, JobStatus.TERMINATING)
            job.stop_requested = "server"
            self._track(job, was)

    @staticmethod
    def _retry_of(run: RunRecord, replica: int) -> ReplicaRetry | None:
        return next((r for r in run.retrying if r.replica_num == replica), None)

    def _resubmit_if_stopped(self, run: RunRecord, replica: int, at: float) -> None:
        """Once every job of a replica being retried has stopped, queue it again as a new
        submission (dstack's ``submission_num + 1``), keeping the run's place in the queue and
        waiting out the backoff (``retry.py``)."""
        retry = self._retry_of(run, replica)
        if retry is None or run.termination_reason is not None:
            return
        gang = [j for j in self.run_jobs(run) if j.replica_num == replica]
        if not all(j.status.is_finished() for j in gang):
            return
        run.retrying.remove(retry)
        if run.spec.service is not None and (
            gang[0].deployment_num < run.deployment_num
            or run.spec.service.group(gang[0].group) is None
        ):
            # A replica of an earlier deployment (or of a group removed since) is not brought
            # back: the rolling update replaces it with one of the current deployment.
            self._reconcile_service(run, at)
            return
        for old in gang:
            job = JobRecord(
                job_id=f"{run.run_id}-{old.replica_num}-{old.job_num}-{old.submission_num + 1}",
                run_name=run.run_name,
                run_id=run.run_id,
                job_num=old.job_num,
                replica_num=old.replica_num,
                submission_num=old.submission_num + 1,
                group=old.group,
                resources=old.resources,
                resources_key=old.resources_key,
                submitted_at=at,
                retry_since=retry.since,
                retry_attempt=retry.attempt,
                not_before=retry.not_before,
                why_pending=f"retrying after {retry.event}: {retry.message}",
                deployment_num=old.deployment_num,
            )
            self.jobs[job.job_id] = job
            self.active[job.job_id] = job
            run.job_ids[run.job_ids.index(old.job_id)] = job.job_id
            run.replaced_job_ids.append(old.job_id)
            self._track(job, None)
        self.demand_version += 1

    def _update_run(self, run: RunRecord, at: float) -> None:
        """Derive the run's status from its jobs, in dstack's priority order (§4.1). The
        decisions (fail, done, resubmit) are taken when jobs end (``_job_ended``)."""
        if run.status.is_finished() or run.awaiting_trigger:
            return  # (a scheduled run between cycles stays PENDING)
        jobs = self.run_jobs(run)
        if run.spec.service is not None and run.termination_reason is None:
            self._update_service_run(run, jobs)
            return
        if all(j.status.is_finished() for j in jobs):
            if run.termination_reason is None:
                all_done = all(j.status is JobStatus.DONE for j in jobs)
                run.termination_reason = (
                    RunTerminationReason.ALL_JOBS_DONE
                    if all_done
                    else RunTerminationReason.JOB_FAILED
                )
            if run.spec.schedule and run.termination_reason not in _USER_STOPS:
                self._rearm(run, at)  # dstack: back to PENDING until the next start
                return
            run.waiting_since = run.next_triggered_at = None
            self._move_run(run, run.termination_reason.to_status())
            run.finished_at = at
            return
        if run.termination_reason is not None:
            self._move_run(run, RunStatus.TERMINATING)
        elif any(j.status is JobStatus.RUNNING for j in jobs):
            self._move_run(run, RunStatus.RUNNING)
        elif any(j.status in (JobStatus.PROVISIONING, JobStatus.PULLING) for j in jobs):
            self._move_run(run, RunStatus.PROVISIONING)
        elif run.retrying:
            self._move_run(run, RunStatus.PENDING)  # stopping replicas to resubmit them (dstack)
        elif any(j.status is JobStatus.TERMINATING for j in jobs):
            self._move_run(run, RunStatus.TERMINATING)
        else:
            self._move_run(run, RunStatus.SUBMITTED)

    # -- queries ------------------------------------------------------------------------------
    def gpus_in_use(self, node_id: str) -> set[int]:
        return {i for j in self.held.get(node_id, {}).values() for i in j.gpu_indices}

    def blocks_in_use(self, node_id: str) -> int:
        return sum(j.blocks for j in self.held.get(node_id, {}).values())

    def waiting_jobs(self) -> list[JobRecord]:
        """Jobs waiting to be placed (``waiting_count`` says how many without a scan)."""
        return [j for j in self.active.values() if j.status is JobStatus.SUBMITTED]

    def jobs_on_node(self, node_id: str) -> list[JobRecord]:
        """Jobs this node must run or stop (assigned and not finished)."""
        return list(self.held.get(node_id, {}).values())

    def list_runs(self, include_finished: bool = False) -> list[RunRecord]:
        runs = [r for r in self.runs.values() if include_finished or not r.status.is_finished()]
        return sorted(runs, key=lambda r: (r.submitted_at, r.run_name), reverse=True)

    def run_jobs(self, run: RunRecord) -> list[JobRecord]:
        return [self.jobs[j] for j in run.job_ids]


_R = TypeVar("_R", bound=BaseModel)


def _without_scaling(config: dict[str, Any]) -> dict[str, Any]:
    """A service configuration less what changes without redeploying (``replicas``,
    ``scaling``, ``priority``, at the top and in each replica group)."""
    out = {k: v for k, v in config.items() if k not in _SCALING_FIELDS}
    groups = out.get("groups")
    if isinstance(groups, list):
        out["groups"] = [
            {k: v for k, v in g.items() if k not in _SCALING_FIELDS} if isinstance(g, dict) else g
            for g in groups
        ]
    return out


def _run_doc(run: RunRecord) -> bytes:
    """``run.to_doc()`` encoded (its fields, then ``config`` as an object), without parsing
    the configuration text back into objects first."""
    fields = run.model_dump_json(exclude=_run_defaults(run)).encode()
    return fields[:-1] + b',"config":' + run.config_text.encode() + b"}"


# Snapshots keep the shape they had before services: a field added for them is written only
# when it holds something (a member that predates it reads every snapshot without it; restore
# fills the defaults back in).
_NO_JOB_EXTRAS: frozenset[str] = frozenset(
    {
        "deployment_num",
        "ready",
        "probes",
        "working_dir",
        "job_user",
        "limits",
        "sessions",
        "inactive_since",
    }
)
_NO_RUN_EXTRAS: frozenset[str] = frozenset(
    {
        "config_text",
        "desired_replicas",
        "last_scaled_at",
        "deployment_num",
        "waiting_since",
        "next_triggered_at",
        "last_triggered_at",
    }
)


def _node_defaults(node: NodeRecord) -> set[str]:
    """A node's SSH, sandbox and toolchain fields left unset (left out of its snapshot: older
    members read it)."""
    out = {k for k in ("ssh_address", "ssh_host_key", "sandbox") if getattr(node, k) is None}
    return out | {k for k in ("pythons", "nvcc") if not getattr(node, k)}


def _job_defaults(job: JobRecord) -> set[str] | frozenset[str]:
    """The service and dev-environment fields of a job left at their defaults (left out of
    its snapshot)."""
    if not (
        job.deployment_num
        or job.ready
        or job.probes
        or job.working_dir is not None
        or job.job_user is not None
        or job.limits is not None
        or job.sessions
        or job.inactive_since is not None
    ):
        return _NO_JOB_EXTRAS
    return {
        k
        for k, unset in (
            ("deployment_num", not job.deployment_num),
            ("ready", not job.ready),
            ("probes", not job.probes),
            ("working_dir", job.working_dir is None),
            ("job_user", job.job_user is None),
            ("limits", job.limits is None),
            ("sessions", not job.sessions),
            ("inactive_since", job.inactive_since is None),
        )
        if unset
    }


def _run_defaults(run: RunRecord) -> set[str] | frozenset[str]:
    """``config_text`` (written as ``config``) and the service fields left at their defaults."""
    if not (
        run.desired_replicas
        or run.last_scaled_at
        or run.deployment_num
        or run.waiting_since is not None
        or run.last_triggered_at is not None
    ):
        return _NO_RUN_EXTRAS
    return {"config_text"} | {
        k
        for k, unset in (
            ("desired_replicas", not run.desired_replicas),
            ("last_scaled_at", not run.last_scaled_at),
            ("deployment_num", not run.deployment_num),
            ("waiting_since", run.waiting_since is None),
            ("next_triggered_at", run.next_triggered_at is None),
            ("last_triggered_at", run.last_triggered_at is None),
        )
        if unset
    }


def _frozen(record: _R) -> _R:
    """A shallow copy of ``record`` whose lists and dicts are copies too (a consistent view for
    ``snapshot_view``: the state machine appends to a run's ``job_ids`` in place, but never
    mutates a value nested deeper)."""
    cls = type(record)
    copy = cls.__new__(cls)
    values = record.__dict__.copy()
    for k, v in values.items():
        if type(v) is list or type(v) is dict:
            values[k] = v.copy()
    # What ``model_copy`` does, less its generality (this runs for every record of a snapshot).
    object.__setattr__(copy, "__dict__", values)
    object.__setattr__(copy, "__pydantic_fields_set__", set(record.__pydantic_fields_set__))
    object.__setattr__(copy, "__pydantic_extra__", None)
    object.__setattr__(copy, "__pydantic_private__", None)
    return copy
