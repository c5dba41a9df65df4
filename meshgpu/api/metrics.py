"""``GET /metrics`` (Prometheus) and ``GET /api/v1/runs/{name}/metrics`` (``meshgpu metrics``).

A job's CPU, memory and GPU use is only visible on the host that runs it, so the node asked
samples its own jobs and asks each other host for the jobs there -- as logs are proxied -- with
``local=true``, which tells that host to answer for itself only (replicas that disagree about
where a job runs can never bounce a request around).
"""

import dataclasses
import time
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import trio
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from meshgpu.api.problems import bearer_token, responses
from meshgpu.api.prometheus import CONTENT_TYPE, node_families, render
from meshgpu.errors import job_not_found
from meshgpu.runner.usage import GroupUsage, cpu_percent, job_pgid, sample_groups
from meshgpu.state import JobRecord

if TYPE_CHECKING:
    from meshgpu.ops import Services

SAMPLE_S = 0.5  # between the two CPU samples of ``meshgpu metrics``
PROXY_TIMEOUT_S = 10.0


def _job_base(services: "Services", j: JobRecord) -> dict[str, Any]:  # noqa: UP037
    node = services.state.nodes.get(j.node_id) if j.node_id else None
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


def _usage_of(services: "Services", jobs: list[JobRecord]) -> dict[str, GroupUsage]:  # noqa: UP037
    """Blocking: one ``/proc`` pass for the jobs' process groups (job id -> usage)."""
    groups = {j.job_id: job_pgid(services.runner.job_dir(j.job_id)) for j in jobs}
    sample = sample_groups(g for g in groups.values() if g is not None)
    return {jid: sample[g] for jid, g in groups.items() if g is not None and g in sample}


async def _sample_here(services: "Services", jobs: list[JobRecord]) -> dict[str, dict[str, Any]]:  # noqa: UP037
    """Two samples ``SAMPLE_S`` apart (CPU percent needs an interval) and the GPUs' telemetry."""

    def first() -> tuple[float, dict[str, GroupUsage]]:
        return time.monotonic(), _usage_of(services, jobs)

    def second() -> tuple[float, dict[str, GroupUsage], list[Any]]:
        return time.monotonic(), _usage_of(services, jobs), services.gpus.telemetry()

    t0, before = await trio.to_thread.run_sync(first)
    await trio.sleep(SAMPLE_S)
    t1, after, telemetry = await trio.to_thread.run_sync(second)
    tele = {t.index: dataclasses.asdict(t) for t in telemetry}
    me = services.state.nodes.get(services.node_id)
    static = {g.index: g for g in me.gpus} if me is not None else {}
    out = {}
    now = time.time()
    for j in jobs:
        entry = _job_base(services, j)
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


async def _ask_owner(
    services: "Services",  # noqa: UP037
    j: JobRecord,
    run: str,
    auth: str,
) -> dict[str, Any]:
    entry = _job_base(services, j)
    owner = services.state.nodes.get(j.node_id or "")
    if owner is None or not owner.api_url:
        entry["error"] = "the host running the job has no API address"
        return entry
    try:
        async with services.http_client(timeout=PROXY_TIMEOUT_S) as c:
            r = await c.get(
                f"{owner.api_url}/api/v1/runs/{run}/metrics",
                params={"job": j.job_num, "local": "true"},
                headers={"Authorization": auth},
            )
    except httpx.HTTPError as e:
        entry["error"] = f"cannot reach {owner.name}: {type(e).__name__}: {e}"
        return entry
    if r.status_code >= 400:
        try:
            doc = r.json()
        except ValueError:
            doc = {"title": r.reason_phrase}
        entry["error"] = f"{owner.name} answered {r.status_code}: {doc.get('title')}"
        return entry
    jobs = r.json().get("jobs") or [entry | {"error": f"{owner.name} sent no sample"}]
    return jobs[0]


async def run_metrics(
    services: "Services",  # noqa: UP037
    name: str,
    job: int | None,
    auth: str,
    local: bool,
) -> dict[str, Any]:
    jobs = services.state.run_jobs(services.runs.get(name))
    if job is not None:
        if not 0 <= job < len(jobs):
            raise job_not_found(name, len(jobs))
        jobs = [jobs[job]]
    entries: dict[str, dict[str, Any]] = {}
    here: list[JobRecord] = []
    elsewhere: list[JobRecord] = []
    for j in jobs:
        if not j.node_id or not j.status.holds_resources():
            entries[j.job_id] = _job_base(services, j) | {
                "error": "the job has finished"
                if j.status.is_finished()
                else "the job is not running yet"
            }
        elif j.node_id == services.node_id:
            here.append(j)
        elif local:
            entries[j.job_id] = _job_base(services, j) | {
                "error": f"this node ({services.node_name}) does not run the job"
            }
        else:
            elsewhere.append(j)

    async def remote(j: JobRecord) -> None:
        entries[j.job_id] = await _ask_owner(services, j, name, auth)

    async def local_jobs() -> None:
        entries.update(await _sample_here(services, here))

    async with trio.open_nursery() as nursery:
        if here:
            nursery.start_soon(local_jobs)
        for j in elsewhere:
            nursery.start_soon(remote, j)
    return {"run": name, "jobs": [entries[j.job_id] for j in jobs]}


async def scrape(services: "Services") -> bytes:  # noqa: UP037
    """This node's ``/metrics`` page."""
    held = services.state.jobs_on_node(services.node_id)

    def sample() -> tuple[list[Any], dict[str, GroupUsage]]:
        return services.gpus.telemetry(), _usage_of(services, held)

    telemetry, usage = await trio.to_thread.run_sync(sample)
    raft = services.cluster.raft_status()
    return render(
        node_families(
            node=services.node_name,
            node_id=services.node_id,
            cluster_id=services.cluster.cluster_id(),
            raft=raft,
            state=services.state,
            telemetry=[dataclasses.asdict(t) for t in telemetry],
            usage=usage,
        )
    )


def router(services: "Services", auth: Any, read: Any) -> APIRouter:  # noqa: UP037
    """The metrics routes (``auth``/``read``: the app's dependencies; see offers.py)."""
    r = APIRouter()

    @r.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format",
                "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
            }
        },
    )
    async def metrics(_: auth) -> Response:
        """Prometheus text format. It names the runs with jobs on this host, so it takes the
        bearer token like the rest of the API (Prometheus: ``authorization.credentials_file``)."""
        return Response(await scrape(services), media_type=CONTENT_TYPE)

    @r.get("/api/v1/runs/{name}/metrics", responses=responses(404))
    async def job_metrics(
        request: Request,
        name: str,
        _: auth,
        __: read,
        job: Annotated[int | None, Query(ge=0, description="Job number; all by default")] = None,
        local: Annotated[
            bool, Query(description="Answer for jobs on this node only (no proxying)")
        ] = False,
    ) -> dict[str, Any]:
        # Asked of the hosts that run the jobs with the caller's token (canonical form).
        auth_header = f"Bearer {bearer_token(request.headers.get('authorization', ''))}"
        return await run_metrics(services, name, job, auth_header, local)

    return r


__all__ = ["router", "run_metrics", "scrape"]
