"""The jobs domain's commands (nodes, runs, jobs): the only way that state changes. Each is a
``Command`` (``codec.py``: one base, one codec, one registry for every domain); an entry in the
Raft log is one encoded command."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from meshgpu.state.codec import Command, decode, encode
from meshgpu.state.records import CodeRef, GPURecord, JobTerminationReason

__all__ = ["Command", "decode", "encode"]  # and the commands below


class RegisterNode(Command):
    kind: Literal["register_node"] = "register_node"
    node_id: str
    name: str
    api_url: str | None = None
    peer_address: str | None = None
    ssh_address: str | None = None
    ssh_host_key: str | None = None
    internal_ip: str = "127.0.0.1"
    labels: dict[str, str] = Field(default_factory=dict)
    gpus: list[GPURecord] = Field(default_factory=list)
    gpu_links: list[list[int]] = Field(default_factory=list)
    cpu_count: int = 1
    cpu_arch: str = "x86"
    memory_mib: int = 0
    disk_gb: float = 0.0
    container_runtime: str | None = None
    # What this host's process jobs get (meshgpu/runner/confine.py): {"user": job user or
    # None, "cgroup": "v1" | "v2" | None, "mount_ns": bool}; left out when unset.
    sandbox: dict[str, Any] | None = Field(default=None, exclude_if=lambda v: v is None)
    # Left out when unset, so a registration without them encodes as before.
    pythons: list[str] = Field(default_factory=list, exclude_if=lambda v: not v)  # "3.N"
    nvcc: bool = Field(default=False, exclude_if=lambda v: not v)  # a CUDA toolkit
    blocks: int | Literal["auto"] | None = Field(
        default=None, description="dstack's blocks: N equal shares of the host; None: GPU by GPU"
    )


class GPUHealth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    index: int
    healthy: bool
    reason: str = ""


class SetGPUHealth(Command):
    """The leader's verdict on GPUs of one host, from the health the host reports through gossip
    (ECC errors, XIDs, a GPU that stopped answering): an unhealthy GPU takes no new jobs (jobs
    already on it keep running); ``healthy=True`` puts it back in service."""

    kind: Literal["set_gpu_health"] = "set_gpu_health"
    node_id: str
    gpus: list[GPUHealth]


class SubmitRun(Command):
    kind: Literal["submit_run"] = "submit_run"
    request_id: str = Field(description="Client-chosen id: a retried submission has effect once")
    run_id: str
    run_name: str
    project: str = "main"
    user: str = "admin"
    config: dict[str, Any]
    run_args: list[str] = Field(default_factory=list)
    code: CodeRef | None = None
    # A scheduled run's first start, computed by the submitting node from the run's ``schedule``
    # (``meshgpu/config/cron.py``); left out of the entry when unset, so entries without it
    # encode as they always did. A scheduled run submitted without it waits for the leader to
    # arm it (``ScheduleRun``).
    next_triggered_at: float | None = Field(default=None, exclude_if=lambda v: v is None)


class ScheduleRun(Command):
    """The leader arms a scheduled run that waits for its next start without a time (it has just
    finished a cycle): ``next_triggered_at`` is computed from the run's ``waiting_since``, which
    is in the state, so every leader computes the same time. Applied only while the run still
    waits since ``waiting_since`` with no time set: a repeat (a new leader re-proposing) is a
    no-op."""

    kind: Literal["schedule_run"] = "schedule_run"
    run_name: str
    waiting_since: float
    next_triggered_at: float


class TriggerRun(Command):
    """The leader starts a scheduled run at its trigger: the run's jobs are queued (a new
    submission of each). Carries the trigger it fires: applied only while the run waits for
    exactly that one, so a repeat after a failover neither starts the run twice nor skips a
    start."""

    kind: Literal["trigger_run"] = "trigger_run"
    run_name: str
    triggered_at: float


class Assignment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    job_id: str
    node_id: str
    gpu_indices: list[int]
    blocks: int = 0  # on a host split into blocks: how many the job takes


class AssignJobs(Command):
    """The leader's scheduler decisions; re-checked at apply, so a stale decision is refused
    rather than double-allocating a GPU. A gang (the waiting jobs of one run replica) is accepted
    whole or refused whole, so no run is ever left half placed."""

    kind: Literal["assign_jobs"] = "assign_jobs"
    assignments: list[Assignment]
    # Why the jobs left waiting wait (only those whose reason changed): the same plan's other
    # half, in the same entry so a busy leader commits one entry per plan.
    pending_reasons: dict[str, str] = Field(default_factory=dict)


class SetPendingReasons(Command):
    kind: Literal["set_pending_reasons"] = "set_pending_reasons"
    reasons: dict[str, str]


class Preemption(BaseModel):
    """Stop ``job_ids`` (whole gangs of lower-priority, preemptible runs) so that ``by_run`` fits."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    by_run: str
    job_ids: list[str]
    message: str = ""


class PreemptJobs(Command):
    """The scheduler's preemptions: victims get the graceful stop, end ``preempted`` and go back to
    the queue when their run's ``retry`` covers ``interruption``. Re-checked at apply: a victim
    that no longer runs, or a preemptor that no longer waits or outranks it, is skipped."""

    kind: Literal["preempt_jobs"] = "preempt_jobs"
    preemptions: list[Preemption]


class JobStarted(Command):
    kind: Literal["job_started"] = "job_started"
    job_id: str
    epoch: int
    started_at: float
    # The job's working directory on its host; left out of the entry when unset, so entries
    # without it encode as they always did.
    working_dir: str | None = Field(default=None, exclude_if=lambda v: v is None)
    # The job's sandbox (process jobs): the OS user it runs as and its cgroup limits
    # ("memory 8GB, cpus 2, pids 32768"); left out when unset, like working_dir.
    user: str | None = Field(default=None, exclude_if=lambda v: v is None)
    limits: str | None = Field(default=None, exclude_if=lambda v: v is None)


class JobFinished(Command):
    kind: Literal["job_finished"] = "job_finished"
    job_id: str
    epoch: int
    reason: JobTerminationReason
    exit_code: int | None = None
    message: str = ""


class JobReports(Command):
    """Several hosts' job reports in one entry: an executor sends what piled up while its last
    report was committing (start and end of short jobs, many jobs ending at once), so a busy host
    costs one Raft entry per round trip instead of two per job. Applied in order."""

    kind: Literal["job_reports"] = "job_reports"
    reports: list[Annotated[JobStarted | JobFinished, Field(discriminator="kind")]]


class ScaleService(Command):
    """The leader's autoscaler (or the user) sets a service replica group's replica count,
    clipped at apply to the group's range. New replicas are queued; excess ones are stopped
    (``scaled_down``) least important first: waiting ones, then not ready, then newest."""

    kind: Literal["scale_service"] = "scale_service"
    run_name: str
    group: str = "0"
    replicas: int = Field(ge=0)
    reason: str = ""


class ProbeReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    job_id: str
    epoch: int
    ready: bool
    probes: list[str] = Field(default_factory=list)  # failing | probing | ready, per probe


class ActivityReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    job_id: str
    epoch: int
    sessions: int = Field(ge=0)
    inactive_since: float | None = None  # when the last session closed (None: never had one)


class JobActivity(Command):
    """A host's SSH activity for the jobs it runs, sent when a job's session count goes to or
    from zero (batched, fenced by epoch like job reports): what ``ps -v`` shows as idle time.
    The host decides inactivity itself (meshgpu/devenv/autostop.py); this is for the views
    and for a restarted agent that lost its session tracker."""

    kind: Literal["job_activity"] = "job_activity"
    reports: list[ActivityReport]


class SetInactivityDuration(Command):
    """Change an active dev environment's ``inactivity_duration`` in place (dstack allows it):
    the host running it applies the new limit at its next check. ``None`` or ``"off"``: off."""

    kind: Literal["set_inactivity_duration"] = "set_inactivity_duration"
    run_name: str
    inactivity_duration: int | Literal["off"] | None = None


class ReplicaProbes(Command):
    """A host's readiness reports for the service replicas it runs, sent when one changes
    (fenced by epoch like job reports)."""

    kind: Literal["replica_probes"] = "replica_probes"
    reports: list[ProbeReport]


class UpdateService(Command):
    """An in-place update of an active service (``meshgpu apply`` of a changed configuration).
    A change in nothing but ``replicas``/``scaling`` (and ``priority``) applies without
    redeploying; any other change starts a rolling deployment (dstack's surge-by-one)."""

    kind: Literal["update_service"] = "update_service"
    run_name: str
    config: dict[str, Any]
    run_args: list[str] = Field(default_factory=list)
    code: CodeRef | None = None


class StopRun(Command):
    kind: Literal["stop_run"] = "stop_run"
    run_name: str
    abort: bool = False
    # Who asked (the audit trail); left out of the entry when unset (older entries).
    by: str = Field(default="", exclude_if=lambda v: not v)


class SetRunPriority(Command):
    """Change an active run's ``priority`` in place (dstack allows it for every run type): its
    waiting jobs move to their new place in the queue, and its running jobs are weighed at the
    new priority by preemption."""

    kind: Literal["set_run_priority"] = "set_run_priority"
    run_name: str
    priority: int = Field(ge=0, le=100)


class PruneRuns(Command):
    """Forget finished runs beyond ``keep`` (newest kept) or older than ``max_age_s``."""

    kind: Literal["prune_runs"] = "prune_runs"
    keep: int = 1000
    max_age_s: float = 7 * 86400
