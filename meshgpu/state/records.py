"""The replicated records: nodes, runs and jobs, with dstack's status machines and reasons
(reference/dstack-semantics.md §4), so ``meshgpu ps`` reads like ``dstack ps``."""

from __future__ import annotations

import enum
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

from meshgpu.config.spec import RunSpec, compile_run


class RunStatus(enum.StrEnum):
    PENDING = "pending"
    SUBMITTED = "submitted"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    FAILED = "failed"
    DONE = "done"

    def is_finished(self) -> bool:
        return self in (RunStatus.TERMINATED, RunStatus.FAILED, RunStatus.DONE)


class JobStatus(enum.StrEnum):
    SUBMITTED = "submitted"
    PROVISIONING = "provisioning"
    PULLING = "pulling"
    RUNNING = "running"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    ABORTED = "aborted"
    FAILED = "failed"
    DONE = "done"

    def is_finished(self) -> bool:
        return self in (JobStatus.TERMINATED, JobStatus.ABORTED, JobStatus.FAILED, JobStatus.DONE)

    def holds_resources(self) -> bool:
        return self in (
            JobStatus.PROVISIONING,
            JobStatus.PULLING,
            JobStatus.RUNNING,
            JobStatus.TERMINATING,
        )


class JobTerminationReason(enum.StrEnum):
    FAILED_TO_START_DUE_TO_NO_CAPACITY = "failed_to_start_due_to_no_capacity"
    INTERRUPTED_BY_NO_CAPACITY = "interrupted_by_no_capacity"
    INSTANCE_UNREACHABLE = "instance_unreachable"
    WAITING_RUNNER_LIMIT_EXCEEDED = "waiting_runner_limit_exceeded"
    TERMINATED_BY_USER = "terminated_by_user"
    SCALED_DOWN = "scaled_down"
    TERMINATED_BY_SERVER = "terminated_by_server"
    INACTIVITY_DURATION_EXCEEDED = "inactivity_duration_exceeded"
    TERMINATED_DUE_TO_UTILIZATION_POLICY = "terminated_due_to_utilization_policy"
    MAX_DURATION_EXCEEDED = "max_duration_exceeded"
    CONTAINER_EXITED_WITH_ERROR = "container_exited_with_error"
    PORTS_BINDING_FAILED = "ports_binding_failed"
    CREATING_CONTAINER_ERROR = "creating_container_error"
    EXECUTOR_ERROR = "executor_error"
    LOG_QUOTA_EXCEEDED = "log_quota_exceeded"
    ABORTED_BY_USER = "aborted_by_user"
    DONE_BY_RUNNER = "done_by_runner"
    # meshgpu's own: stopped so that a higher-priority run could start (dstack has no preemption).
    PREEMPTED = "preempted"

    def to_status(self) -> JobStatus:
        if self is JobTerminationReason.DONE_BY_RUNNER:
            return JobStatus.DONE
        if self is JobTerminationReason.ABORTED_BY_USER:
            return JobStatus.ABORTED
        if self in _TERMINATED_REASONS:
            return JobStatus.TERMINATED
        return JobStatus.FAILED

    def to_retry_event(self) -> str | None:
        """The ``retry.on_events`` entry that lets a run retry after this (dstack §4.2).

        Unlike dstack, a host lost from the mesh (``instance_unreachable``) is an *interruption*,
        not an error: meshgpu hosts are peers that come and go, and the job did nothing wrong.
        """
        if self is JobTerminationReason.FAILED_TO_START_DUE_TO_NO_CAPACITY:
            return "no-capacity"
        if self in _INTERRUPTIONS:
            return "interruption"
        if self.to_status() is JobStatus.FAILED:
            return "error"
        return None


_TERMINATED_REASONS = frozenset(
    {
        JobTerminationReason.TERMINATED_BY_USER,
        JobTerminationReason.SCALED_DOWN,
        JobTerminationReason.TERMINATED_BY_SERVER,
        JobTerminationReason.INACTIVITY_DURATION_EXCEEDED,
        JobTerminationReason.TERMINATED_DUE_TO_UTILIZATION_POLICY,
        JobTerminationReason.MAX_DURATION_EXCEEDED,
        JobTerminationReason.PREEMPTED,
    }
)


_INTERRUPTIONS = frozenset(
    {
        JobTerminationReason.INTERRUPTED_BY_NO_CAPACITY,
        JobTerminationReason.INSTANCE_UNREACHABLE,
        JobTerminationReason.PREEMPTED,
    }
)


class RunTerminationReason(enum.StrEnum):
    ALL_JOBS_DONE = "all_jobs_done"
    JOB_FAILED = "job_failed"
    RETRY_LIMIT_EXCEEDED = "retry_limit_exceeded"
    STOPPED_BY_USER = "stopped_by_user"
    ABORTED_BY_USER = "aborted_by_user"
    SERVER_ERROR = "server_error"

    def to_status(self) -> RunStatus:
        if self is RunTerminationReason.ALL_JOBS_DONE:
            return RunStatus.DONE
        if self in (RunTerminationReason.STOPPED_BY_USER, RunTerminationReason.ABORTED_BY_USER):
            return RunStatus.TERMINATED
        return RunStatus.FAILED


class _Record(BaseModel):
    # Records are mutated only inside ``StateMachine.apply``; validation on assignment would cost
    # on every command for no safety gain there.
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class GPURecord(_Record):
    index: int
    uuid: str
    name: str
    vendor: str
    memory_mib: int
    compute_capability: str | None = None
    numa_node: int | None = None
    healthy: bool = True
    health_reason: str = ""  # why it is unhealthy, as its host reported it


class NodeRecord(_Record):
    node_id: str
    name: str
    api_url: str | None = None
    peer_address: str | None = None
    # The host's SSH server into its jobs ("host:port"; None: it runs none) and its host key
    # (OpenSSH public key text): registered by the node itself over its CA-certified identity,
    # so a client that trusts the cluster pins it (``meshgpu attach`` writes known_hosts).
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
    # What its process jobs get (meshgpu/runner/confine.py): {"user": the job user or None,
    # "cgroup": "v1" | "v2" | None, "mount_ns": bool, "pid_ns": bool}; None: a host that predates
    # the sandbox (a missing "pid_ns": one that predates the PID namespace, as false).
    sandbox: dict[str, Any] | None = None
    # The toolchain the host's jobs can use (runner/toolchain.py): Python versions ("3.11") the
    # job user can execute, and whether a CUDA toolkit (nvcc) is installed.
    pythons: list[str] = Field(default_factory=list)
    nvcc: bool = False
    # dstack's ``blocks``: split the host into N equal shares of GPUs/CPUs/memory, each job taking
    # whole blocks; ``auto`` = as many as GPUs and CPUs both divide into (one per GPU on a usual
    # GPU host). None (the default): no blocks, the host is shared GPU by GPU.
    blocks: int | Literal["auto"] | None = None
    status: str = "active"  # active | draining | dead
    registered_at: float = 0.0

    def block_count(self) -> int | None:
        """How many blocks the host is split into (None: not split, shared GPU by GPU).

        ``blocks`` (``meshgpu agent --blocks``; without it, the label ``blocks``) gives N or
        ``auto``. GPUs and CPUs must divide evenly into blocks (dstack): ``auto`` is the largest
        count both divide into, and an N that does not divide them is lowered to the largest
        count below it that does.
        """
        raw: Any = self.blocks if self.blocks is not None else self.labels.get("blocks")
        if raw is None:
            return None
        gpus, cpus = len(self.gpus), max(self.cpu_count, 1)
        if raw == "auto":
            return math.gcd(gpus, cpus) if gpus else cpus
        try:
            n = int(raw)
        except (TypeError, ValueError):
            return None
        if n < 1:
            return None
        # Every count that divides both divides their gcd: start there, not at a huge N.
        n = min(n, math.gcd(gpus, cpus))
        while n > 1 and (gpus % n or cpus % n):
            n -= 1
        return n


class JobRecord(_Record):
    job_id: str
    run_name: str
    run_id: str
    job_num: int = 0
    replica_num: int = 0
    submission_num: int = 0
    group: str | None = None
    status: JobStatus = JobStatus.SUBMITTED
    termination_reason: JobTerminationReason | None = None
    termination_message: str = ""
    resources: dict[str, Any] = Field(default_factory=dict)
    resources_key: str = ""  # canonical text of ``resources``: equal keys fit the same hosts
    node_id: str | None = None
    gpu_indices: list[int] = Field(default_factory=list)
    blocks: int = 0  # blocks held on a host split into blocks (0 elsewhere)
    epoch: int = 0  # bumped by every assignment; reports from an older epoch are fenced off
    submitted_at: float = 0.0
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    # While TERMINATING: "stop" / "abort" (the user's), "server" (meshgpu's own: the rest of a
    # failed gang, a replica to resubmit, workers after a master-done).
    stop_requested: str | None = None
    preempted_by: str | None = None  # the run this job is being stopped for
    why_pending: str = ""
    # Retry (see ``RunRecord.retrying``): a resubmission is attempt ``retry_attempt`` of a streak
    # of failures that began at ``retry_since``, and waits in the queue until ``not_before``.
    retry_since: float | None = None
    retry_attempt: int = 0
    not_before: float = 0.0
    # Services: the deployment (``RunRecord.deployment_num``) the replica was created for, and
    # its readiness as the host running it last reported (``ReplicaProbes``): ``ready`` means it
    # may receive traffic (RUNNING, every probe passed ``ready_after`` times, or the port
    # accepts connections when the service has no probes); one state per probe, dstack's
    # ``×``/``~``/``✓``: "failing" | "probing" | "ready".
    deployment_num: int = 0
    ready: bool = False
    probes: list[str] = Field(default_factory=list)
    # Where the job's working directory is on its host (as the host reported it at start: the
    # IDE links and ``ssh RUN`` open there), and who is attached (``JobActivity``, sent by the
    # host on change): open SSH sessions, and since when none has been open (None: never had
    # one, so idle since it started). ``ps -v`` shows the idle time from them.
    working_dir: str | None = None
    # Its sandbox as the host reported it at start (process jobs): the OS user it runs as and
    # its cgroup limits ("memory 8GB, cpus 2, pids 32768"); ``ps -v`` shows them.
    job_user: str | None = None
    limits: str | None = None
    sessions: int = 0
    inactive_since: float | None = None


class ReplicaRetry(_Record):
    """A replica being stopped so that it can be resubmitted (dstack's retry)."""

    replica_num: int
    event: str  # the retry event: error | interruption
    since: float | None  # when the streak of failures this retry belongs to began
    attempt: int  # 1 for the first retry of a streak (a preemption keeps the count)
    at: float  # when it was decided (the failure's time)
    not_before: float  # the new submission may not start earlier (backoff)
    message: str = ""


class CodeRef(_Record):
    """Where the run's uploaded working directory lives (content-addressed): ``node_id``
    accepted the upload and pushed copies to ``holders`` (meshgpu/runner/code.py); a host that
    runs one of the run's jobs fetches it from them, or from any member that has it."""

    sha256: str
    size: int
    node_id: str
    holders: list[str] = Field(default_factory=list)


class RunRecord(_Record):
    run_id: str
    run_name: str
    project: str = "main"
    user: str = "admin"
    request_id: str | None = None
    # The run's configuration as the user gave it (rendered: every field, defaults filled), kept
    # as compact JSON text: shown back (``GET /api/v1/runs/{name}``), compared by in-place
    # updates, written to snapshots as the ``config`` object. Nothing else reads it: ``spec``
    # is what meshgpu does with the run, compiled from it (``meshgpu/config/spec.py``).
    config_text: str
    spec: SkipValidation[RunSpec] = Field(exclude=True, repr=False)
    run_args: list[str] = Field(default_factory=list)
    code: CodeRef | None = None
    priority: int = 0
    status: RunStatus = RunStatus.SUBMITTED
    termination_reason: RunTerminationReason | None = None
    submitted_at: float = 0.0
    finished_at: float | None = None
    job_ids: list[str] = Field(default_factory=list)
    # Earlier submissions of resubmitted jobs (retry): kept for history, forgotten with the run.
    replaced_job_ids: list[str] = Field(default_factory=list)
    # Replicas whose jobs are stopping to be resubmitted (one entry per replica).
    retrying: list[ReplicaRetry] = Field(default_factory=list)
    # Services: how many replicas each replica group should have (the autoscaler's or the
    # configuration's count, by group name; a plain service is group "0"), when each group's
    # count last changed (the scaling delays count from it), and the deployment the run is at
    # (bumped by an in-place update that changes more than replicas/scaling: a rolling update).
    desired_replicas: dict[str, int] = Field(default_factory=dict)
    last_scaled_at: dict[str, float] = Field(default_factory=dict)
    deployment_num: int = 0
    # Scheduled runs (``schedule:``, dstack): while the run waits for its next start (PENDING,
    # no jobs running), since when it waits -- its submission, or the end of its last cycle --
    # and the start it waits for (None until the leader arms it: ``ScheduleRun``); and when it
    # last started. ``waiting_since`` is None while a cycle runs (and for unscheduled runs).
    waiting_since: float | None = None
    next_triggered_at: float | None = None
    last_triggered_at: float | None = None

    @property
    def awaiting_trigger(self) -> bool:
        """A scheduled run between cycles (not being stopped)."""
        return self.waiting_since is not None and self.termination_reason is None

    @property
    def config(self) -> dict[str, Any]:
        """The rendered configuration (a fresh copy: changing it changes nothing)."""
        return json.loads(self.config_text)

    @classmethod
    def create(cls, config: dict[str, Any], **fields: Any) -> RunRecord:
        """A run from its rendered configuration: kept as text, compiled to its spec."""
        return cls(config_text=config_text(config), spec=compile_run(config), **fields)

    def set_config(self, config: dict[str, Any]) -> None:
        self.config_text = config_text(config)
        self.spec = compile_run(config)

    def to_doc(self) -> dict[str, Any]:
        """The snapshot form: the record's fields with ``config`` as an object, as ever."""
        doc = self.model_dump(mode="json", exclude={"config_text"})
        doc["config"] = self.config
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> RunRecord:
        doc = dict(doc)
        config = doc.pop("config")
        return cls.create(config, **doc)


def config_text(config: dict[str, Any]) -> str:
    return json.dumps(config, separators=(",", ":"))
