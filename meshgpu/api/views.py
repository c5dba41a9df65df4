"""JSON views of records: the stable shapes of the API and of ``--json`` output."""

from __future__ import annotations

import dataclasses
from typing import Any

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


def run_view(r: RunRecord, state: StateMachine) -> dict[str, Any]:
    return {
        "name": r.run_name,
        "id": r.run_id,
        "project": r.project,
        "user": r.user,
        "type": r.config.get("type"),
        "status": r.status.value,
        "status_message": run_status_message(r, state),
        "termination_reason": r.termination_reason.value if r.termination_reason else None,
        "priority": r.priority,
        "submitted_at": r.submitted_at,
        "finished_at": r.finished_at,
        "config": r.config,
        "jobs": [job_view(j, state) for j in state.run_jobs(r)],
    }


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
        "labels": n.labels,
        "cpu_count": n.cpu_count,
        "cpu_arch": n.cpu_arch,
        "memory_gb": round(n.memory_mib / 1024, 1),
        "disk_gb": n.disk_gb,
        "container_runtime": n.container_runtime,
        "gpus": [g.model_dump() | {"busy": g.index in busy} for g in n.gpus],
        # dstack's blocks: how many equal shares the host is split into (None: GPU by GPU).
        "blocks": blocks,
        "busy_blocks": state.blocks_in_use(n.node_id) if blocks is not None else None,
    }


def offer_view(o: Offer) -> dict[str, Any]:
    """One host in ``GET /api/v1/offers`` (``meshgpu offer --json``)."""
    return dataclasses.asdict(o) | {"gpu_indices": list(o.gpu_indices)}
