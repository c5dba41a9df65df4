"""``GET /metrics`` (Prometheus) and ``GET /api/v1/runs/{name}/metrics`` (``meshgpu metrics``,
the use case ``meshgpu.ops.metrics.Metrics``: other hosts are asked over the peer port)."""

import dataclasses
from typing import TYPE_CHECKING, Annotated, Any

import trio
from fastapi import APIRouter, Query
from fastapi.responses import Response

from meshgpu.api.problems import responses
from meshgpu.api.prometheus import CONTENT_TYPE, node_families, render
from meshgpu.errors import Denied
from meshgpu.ops.history import DEFAULT_POINTS, MAX_POINTS
from meshgpu.ops.metrics import usage_of
from meshgpu.runner.usage import GroupUsage

if TYPE_CHECKING:
    from meshgpu.ops import Services


async def scrape(services: "Services") -> bytes:  # noqa: UP037
    """This node's ``/metrics`` page."""
    held = services.state.jobs_on_node(services.node_id)

    def sample() -> tuple[list[Any], dict[str, GroupUsage]]:
        return services.gpus.telemetry(), usage_of(services.runner, held)

    telemetry, usage = await trio.to_thread.run_sync(sample)
    raft = services.cluster.raft_status()
    families = node_families(
        node=services.node_name,
        node_id=services.node_id,
        cluster_id=services.cluster.cluster_id(),
        raft=raft,
        state=services.state,
        telemetry=[dataclasses.asdict(t) for t in telemetry],
        usage=usage,
    )
    if services.ingress is not None:  # per-service requests and latency at this ingress
        families += services.ingress.metric_families(services.node_name)
    return render(families)


def router(services: "Services", auth: Any, read: Any) -> APIRouter:  # noqa: UP037
    """The metrics routes (``auth``/``read``: the app's dependencies; see offers.py)."""
    r = APIRouter()

    @r.get(
        "/metrics",
        response_class=Response,
        responses={
            **responses(403),
            200: {
                "description": "Prometheus text exposition format",
                "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
            },
        },
    )
    async def metrics(who: auth) -> Response:
        """Prometheus text format. It names the runs with jobs on this host, of every project,
        so it takes a global admin's bearer token (Prometheus:
        ``authorization.credentials_file``)."""
        if not who.is_admin:
            raise Denied("not allowed", "/metrics is for global admins", "forbidden")
        return Response(await scrape(services), media_type=CONTENT_TYPE)

    @r.get("/api/v1/runs/{name}/metrics", responses=responses(403, 404))
    async def job_metrics(
        name: str,
        who: auth,
        __: read,
        job: Annotated[int | None, Query(ge=0, description="Job number; all by default")] = None,
        local: Annotated[
            bool, Query(description="Answer for jobs on this node only (no proxying)")
        ] = False,
    ) -> dict[str, Any]:
        # The hosts that run the jobs are asked over the peer port (meshgpu/peer).
        if services.access is not None:
            services.access.see_run(who, name)
        return await services.metrics.run(name, job, local=local)

    @r.get("/api/v1/runs/{name}/history", responses=responses(404))
    async def job_history(
        name: str,
        _: auth,
        __: read,
        since_s: Annotated[
            float,
            Query(gt=0, le=7 * 86400, description="How far back, in seconds (at most 7 days)"),
        ] = 3600.0,
        points: Annotated[
            int,
            Query(ge=1, le=MAX_POINTS, description="Most samples per series (averaged down)"),
        ] = DEFAULT_POINTS,
        job: Annotated[int | None, Query(ge=0, description="Job number; all by default")] = None,
        local: Annotated[
            bool, Query(description="Answer for jobs on this node only (no proxying)")
        ] = False,
    ) -> dict[str, Any]:
        """Each job's CPU, memory and GPU samples over the last ``since_s`` seconds, kept by
        the host that ran it (10 s apart for 24 h, 5-minute averages for a week): columns
        ``t`` (Unix seconds), ``cpu_pct``, ``memory_bytes``, ``processes`` and per GPU
        ``utilization_pct``, ``memory_used_mib``, ``temperature_c``, ``power_w`` (null: not
        reported)."""
        return await services.metrics.history_of(
            name, job, since_s=since_s, points=points, local=local
        )

    return r


__all__ = ["router", "scrape"]
