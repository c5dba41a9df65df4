"""JSON views of records: the stable shapes of the API and of ``--json`` output."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import heapq
import json
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, Field

from meshgpu.api.problems import Problem
from meshgpu.scheduler.offer import Offer
from meshgpu.state import JobRecord, JobStatus, NodeRecord, RunRecord, RunStatus, StateMachine


def job_view(j: JobRecord, state: StateMachine) -> dict[str, Any]:
    node = state.nodes.get(j.node_id) if j.node_id else None
    return {
        "job_id": j.job_id,
        "job_num": j.job_num,
        "replica_num": j.replica_num,
        "submission_num": j.submission_num,
        "group": j.group,
        "status": j.status.value,
        "termination_reason": j.termination_reason.value if j.termination_reason else None,
        "termination_message": j.termination_message,
        "exit_code": j.exit_code,
        "node": node.name if node else None,
        "node_id": j.node_id,
        "gpus": j.gpu_indices,
        "resources": j.resources,
        "why_pending": j.why_pending,
        "submitted_at": j.submitted_at,
        "assigned_at": j.assigned_at,
        "started_at": j.started_at,
        "finished_at": j.finished_at,
        # services: which deployment the replica belongs to, whether it receives traffic, and
        # its probes (dstack's ×/~/✓ as failing/probing/ready)
        "deployment_num": j.deployment_num,
        "ready": j.ready,
        "probes": j.probes,
        # where its commands run on its host (SSH sessions and IDE links open there), and who
        # is attached: dstack's ``inactivity_secs`` counts from the last session's end (from
        # the start when it never had one)
        "working_dir": j.working_dir,
        # its sandbox (process jobs): the OS user it runs as, its cgroup limits
        "user": j.job_user,
        "limits": j.limits,
        "sessions": j.sessions,
        "inactive_since": j.inactive_since,
        "inactivity_secs": inactivity_secs(j),
    }


def inactivity_secs(j: JobRecord, now: float | None = None) -> int | None:
    """How long a running job has had no SSH session (None: one is open, or it is not
    running), as its host last reported."""
    if j.status is not JobStatus.RUNNING or j.sessions or j.started_at is None:
        return None
    since = max(j.inactive_since or 0.0, j.started_at)
    return max(0, int((time.time() if now is None else now) - since))


def dev_environment_view(r: RunRecord) -> dict[str, Any] | None:
    """A dev environment's IDE and auto-stop settings (None for other runs)."""
    if r.spec.type != "dev-environment":
        return None
    return {
        "ide": r.spec.ide,
        "inactivity_duration": r.spec.inactivity_duration_s,
    }


def run_status_message(r: RunRecord, state: StateMachine) -> str:
    """What ``ps`` shows as the status: dstack's ``retrying`` for a run waiting to run again
    after a failure its ``retry`` covers, else the status itself."""
    if r.status in (RunStatus.PENDING, RunStatus.SUBMITTED) and (
        r.retrying
        or any(j.submission_num > 0 and j.status is JobStatus.SUBMITTED for j in state.run_jobs(r))
    ):
        return "retrying"
    return r.status.value


class ServiceInfo(Protocol):
    """What the views add to a service from this node (``meshgpu.services.rates``)."""

    domain: str | None

    def rps(self, run: RunRecord) -> float | None: ...


def service_view(
    r: RunRecord, state: StateMachine, info: ServiceInfo | None = None
) -> dict[str, Any] | None:
    """Where a service answers (paths on every node's API port; ``url`` with
    ``--ingress-domain``), its model base path, and its replicas as the ingress sees them."""
    svc = r.spec.service
    if svc is None:
        return None
    jobs = [j for j in state.run_jobs(r) if not j.status.is_finished()]
    domain = info.domain if info is not None else None
    return {
        "path": f"/proxy/services/{r.project}/{r.run_name}/",
        "url": f"https://{r.run_name}.{domain}/" if domain else None,
        "model": svc.model.name if svc.model else None,
        "model_base_path": f"/proxy/models/{r.project}/" if svc.model else None,
        "auth": svc.auth,
        "port": svc.port,
        "deployment_num": r.deployment_num,
        "desired_replicas": dict(r.desired_replicas),
        "replicas": len(jobs),
        "ready_replicas": sum(1 for j in jobs if j.ready and j.status is JobStatus.RUNNING),
        "rps": info.rps(r) if info is not None else None,
    }


def run_summary(
    r: RunRecord, state: StateMachine, info: ServiceInfo | None = None
) -> dict[str, Any]:
    """A run as lists show it (``GET /api/v1/runs``): everything but its configuration."""
    return {
        "name": r.run_name,
        "id": r.run_id,
        "project": r.project,
        "user": r.user,
        "type": r.spec.type,
        "status": r.status.value,
        "status_message": run_status_message(r, state),
        "termination_reason": r.termination_reason.value if r.termination_reason else None,
        "priority": r.priority,
        "submitted_at": r.submitted_at,
        "finished_at": r.finished_at,
        "schedule": list(r.spec.schedule) or None,
        "next_triggered_at": r.next_triggered_at,
        "last_triggered_at": r.last_triggered_at,
        "jobs": [job_view(j, state) for j in state.run_jobs(r)],
        "service": service_view(r, state, info),
        "dev_environment": dev_environment_view(r),
        "utilization_policy": (
            {
                "min_gpu_utilization": r.spec.utilization.min_gpu_utilization,
                "time_window": r.spec.utilization.time_window_s,
            }
            if r.spec.utilization is not None
            else None
        ),
    }


def run_view(r: RunRecord, state: StateMachine, info: ServiceInfo | None = None) -> dict[str, Any]:
    """One run (``GET /api/v1/runs/{name}``, answers to writes): the summary and its
    configuration (every field, defaults filled)."""
    return run_summary(r, state, info) | {"config": r.config}


def node_view(n: NodeRecord, state: StateMachine, role: str = "") -> dict[str, Any]:
    busy = state.gpus_in_use(n.node_id)
    blocks = n.block_count()
    return {
        "node_id": n.node_id,
        "name": n.name,
        "role": role,
        "status": n.status,
        "api_url": n.api_url,
        "internal_ip": n.internal_ip,
        "ssh_address": n.ssh_address,
        "ssh_host_key": n.ssh_host_key,
        "labels": n.labels,
        "cpu_count": n.cpu_count,
        "cpu_arch": n.cpu_arch,
        "memory_gb": round(n.memory_mib / 1024, 1),
        "disk_gb": n.disk_gb,
        "container_runtime": n.container_runtime,
        # what its process jobs get: {"user", "cgroup": v1|v2|null, "mount_ns"} (null: unknown)
        "sandbox": n.sandbox,
        # What process jobs' ``python: X.Y`` and ``nvcc: true`` can have here.
        "pythons": n.pythons,
        "nvcc": n.nvcc,
        "gpus": [g.model_dump() | {"busy": g.index in busy} for g in n.gpus],
        # dstack's blocks: how many equal shares the host is split into (None: GPU by GPU).
        "blocks": blocks,
        "busy_blocks": state.blocks_in_use(n.node_id) if blocks is not None else None,
    }


def offer_view(o: Offer) -> dict[str, Any]:
    """One host in ``GET /api/v1/offers`` (``meshgpu offer --json``)."""
    return dataclasses.asdict(o) | {"gpu_indices": list(o.gpu_indices)}


# -- pages ------------------------------------------------------------------------------------
# Lists are answered a page at a time, newest first. A cursor is opaque to clients: the sort key
# of the last item of the page before (URL-safe base64 of JSON, tagged with what it lists), so
# pages stay consistent while items come and go (keyset pagination: nothing is skipped or shown
# twice because an earlier item was added or forgotten).

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

T = TypeVar("T")
Key = tuple[float, str]


def encode_cursor(kind: str, key: Key) -> str:
    raw = json.dumps([kind, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(kind: str, cursor: str) -> Key:
    """The key a cursor of ``kind`` stands for; 422 for anything an earlier answer did not give."""
    try:
        doc = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        doc = None
    if (
        isinstance(doc, list)
        and len(doc) == 3
        and doc[0] == kind
        and isinstance(doc[1], int | float)
        and not isinstance(doc[1], bool)
        and math.isfinite(doc[1])
        and isinstance(doc[2], str)
    ):
        return float(doc[1]), doc[2]
    raise Problem(
        422,
        "invalid cursor",
        f"{cursor[:80]!r} is not a cursor of {kind}: pass back the next_cursor of an earlier "
        "answer unchanged, or none for the first page",
        "invalid_cursor",
    )


def page(
    items: Iterable[T], key: Callable[[T], Key], limit: int, after: Key | None
) -> tuple[list[T], Key | None]:
    """The ``limit`` items with the greatest keys below ``after`` (all if None), greatest
    first, and the key to continue after (None: this is the last page)."""
    if after is not None:
        items = (i for i in items if key(i) < after)
    top = heapq.nlargest(limit + 1, items, key=key)
    if len(top) > limit:
        return top[:limit], key(top[limit - 1])
    return top, None


def run_key(r: RunRecord) -> Key:
    return r.submitted_at, r.run_name


def node_key(n: NodeRecord) -> Key:
    return n.registered_at, n.node_id


# -- documented shapes ------------------------------------------------------------------------
# The views above answer as plain dicts (no per-item validation on the way out); these models
# document them in /openapi.json, where schemathesis checks every answer against them.


class JobView(BaseModel):
    job_id: str
    job_num: int
    replica_num: int
    submission_num: int
    group: str | None
    status: str
    termination_reason: str | None
    termination_message: str
    exit_code: int | None
    node: str | None
    node_id: str | None
    gpus: list[int]
    resources: dict[str, Any]
    why_pending: str
    submitted_at: float
    assigned_at: float | None
    started_at: float | None
    finished_at: float | None
    deployment_num: int = 0
    ready: bool = Field(default=False, description="A service replica receiving traffic")
    probes: list[str] = Field(default_factory=list, description="failing | probing | ready")
    working_dir: str | None = Field(
        default=None, description="Where its commands run on its host (SSH sessions open there)"
    )
    user: str | None = Field(
        default=None, description="The OS user it runs as (null: the agent's own user)"
    )
    limits: str | None = Field(
        default=None, description="Its cgroup limits, e.g. 'memory 8GB, cpus 2, pids 32768'"
    )
    sessions: int = Field(default=0, description="SSH sessions open into it")
    inactive_since: float | None = Field(
        default=None, description="When its last SSH session closed (null: never had one)"
    )
    inactivity_secs: int | None = Field(
        default=None, description="Seconds without an SSH session (null: attached or not running)"
    )


class DevEnvironmentView(BaseModel):
    ide: str | None = Field(description="vscode | cursor | windsurf | zed")
    inactivity_duration: int | None = Field(description="Seconds; null: off")


class UtilizationPolicyView(BaseModel):
    min_gpu_utilization: int
    time_window: int = Field(description="Seconds")


class ServiceView(BaseModel):
    path: str = Field(description="Its ingress path on every node's API port")
    url: str | None = Field(description="Its host-routed URL (agents with --ingress-domain)")
    model: str | None
    model_base_path: str | None = Field(description="The OpenAI-compatible base path")
    auth: bool
    port: int
    deployment_num: int
    desired_replicas: dict[str, int] = Field(description="Replicas wanted, by replica group")
    replicas: int = Field(description="Replicas that have not finished")
    ready_replicas: int = Field(description="Replicas receiving traffic")
    rps: float | None = Field(description="Requests per second over the scaling window")


class RunSummary(BaseModel):
    name: str
    id: str
    project: str
    user: str
    type: str | None
    status: str
    status_message: str = Field(description="The status as ps shows it (e.g. retrying)")
    termination_reason: str | None
    priority: int
    submitted_at: float
    finished_at: float | None
    schedule: list[str] | None = Field(
        default=None, description="The cron expressions of a scheduled run (day-of-week 0 = Monday)"
    )
    next_triggered_at: float | None = Field(
        default=None,
        description="A scheduled run waiting between starts: when it starts next (null: not "
        "waiting, or not yet armed)",
    )
    last_triggered_at: float | None = Field(
        default=None, description="When a scheduled run last started"
    )
    jobs: list[JobView]
    service: ServiceView | None = None
    dev_environment: DevEnvironmentView | None = None
    utilization_policy: UtilizationPolicyView | None = None


class RunView(RunSummary):
    config: dict[str, Any] = Field(description="The configuration: every field, defaults filled")


class SubmittedRun(RunView):
    updated_in_place: list[str] | None = Field(
        default=None,
        description="Present when an active run was updated in place: what changed "
        "(['priority'], ['inactivity_duration'] of a dev environment, or a service's changed "
        "fields; [] when applied unchanged)",
    )


class RunPage(BaseModel):
    runs: list[RunSummary] = Field(description="Newest first; no configurations")
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null: none")


class NodeView(BaseModel):
    node_id: str
    name: str
    role: str
    status: str
    api_url: str | None
    internal_ip: str
    ssh_address: str | None = Field(
        default=None, description="host:port of the node's SSH server into its jobs"
    )
    ssh_host_key: str | None = Field(
        default=None, description="The SSH server's host key (OpenSSH public key line)"
    )
    labels: dict[str, str]
    cpu_count: int
    cpu_arch: str
    memory_gb: float
    disk_gb: float
    container_runtime: str | None
    sandbox: dict[str, Any] | None = Field(
        default=None,
        description="What its process jobs get: user, cgroup (v1, v2 or null), mount_ns",
    )
    pythons: list[str] = Field(
        default_factory=list, description="Python versions the host's job user can run"
    )
    nvcc: bool = Field(default=False, description="The host has a CUDA toolkit (nvcc)")
    gpus: list[dict[str, Any]]
    blocks: int | None
    busy_blocks: int | None
    gossip: dict[str, Any] | None = Field(description="This node's gossip view of the host")
    telemetry: list[dict[str, Any]] | None = Field(description="Per-GPU telemetry, if known")


class NodePage(BaseModel):
    nodes: list[NodeView] = Field(description="Newest (last registered) first")
    gossip: dict[str, Any] = Field(description="This node's gossip status")
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null: none")
