"""The REST API every node serves: FastAPI, run in-process by ``hypercorn.trio.serve``."""

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from meshgpu.api import problems
from meshgpu.api.problems import Problem
from meshgpu.api.views import node_view, run_view

if TYPE_CHECKING:
    from meshgpu.agent import Agent  # noqa: F401

MAX_JSON_BODY = 1 << 20
APPLIED_HEADER = "X-Meshgpu-Applied-Index"


class SubmitBody(BaseModel):
    config: str = Field(description="The configuration file's text (YAML)")
    filename: str = "<config>"
    name: str | None = None
    run_args: list[str] = Field(default_factory=list)
    code_sha256: str | None = None
    request_id: str = Field(min_length=8, max_length=128, description="Idempotency key")
    env: dict[str, str] = Field(
        default_factory=dict, description="Values for env sentinels, -e overrides"
    )
    gpu: str | None = Field(default=None, description="Override resources.gpu (the --gpu flag)")


class StopBody(BaseModel):
    abort: bool = False


def create_app(agent: "Agent") -> FastAPI:  # noqa: UP037 - annotations are evaluated (FastAPI)
    app = FastAPI(title="meshgpu", version="0.1.0", docs_url=None, redoc_url=None)
    problems.install(app)

    @app.middleware("http")
    async def limits_and_index(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        limit = (
            agent.settings.code_limit + (64 << 10)
            if request.url.path == "/api/v1/code"
            else MAX_JSON_BODY
        )
        if length is not None and int(length) > limit:
            return problems.problem_response(
                413,
                "request too large",
                f"{int(length)} bytes is over the {limit} byte limit",
                "too_large",
            )
        response = await call_next(request)
        if agent.node is not None:
            response.headers[APPLIED_HEADER] = str(agent.node.applied)
        return response

    async def auth(request: Request) -> None:
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not token or not agent.api_token_ok(token):
            raise Problem(
                401,
                "unauthorized",
                "send Authorization: Bearer <token> (see ~/.meshgpu/client.toml)",
                "unauthorized",
            )

    async def consistent_read(consistent: bool = False) -> None:
        if consistent:
            try:
                await agent.node.read_index(timeout=10)
            except Exception as e:  # Timeout while there is no leader
                raise Problem(
                    503, "no linearizable read possible now", str(e), "unavailable"
                ) from None

    Auth = Annotated[None, Depends(auth)]
    Read = Annotated[None, Depends(consistent_read)]

    @app.post("/api/v1/join")
    async def join(request: Request) -> dict[str, Any]:
        """A new host asks to join; authenticated by its token proof, not a bearer token."""
        try:
            body = await request.json()
        except ValueError:
            raise Problem(
                400, "malformed join request", "expected JSON", "invalid_request"
            ) from None
        if not isinstance(body, dict):
            raise Problem(
                400, "malformed join request", "expected a JSON object", "invalid_request"
            )
        return await agent.admit(body)

    @app.post("/api/v1/tokens", status_code=201)
    async def create_token(_: Auth, ttl_s: float | None = None) -> dict[str, Any]:
        token = await agent.create_join_token(ttl_s)
        return {"token": token, "token_id": token.split(".")[3]}

    @app.delete("/api/v1/tokens/{token_id}")
    async def revoke_token(token_id: str, _: Auth) -> dict[str, Any]:
        result = await agent.revoke_join_token(token_id)
        if not result.ok:
            raise Problem(404, "token not found", result.error, result.code)
        return {"revoked": token_id}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "node": agent.node_name}

    @app.get("/api/v1/status")
    async def status(_: Auth, __: Read) -> dict[str, Any]:
        return agent.cluster_status()

    @app.get("/api/v1/nodes")
    async def nodes(_: Auth, __: Read) -> dict[str, Any]:
        """The replicated records, each with this node's gossip view of the host (``gossip``:
        alive/suspect/dead/left, load, reported GPU faults; ``null`` when gossip does not
        know it) and live ``telemetry`` (sampled now for this host, from gossip for peers)."""
        roles = agent.roles()
        telemetry = await agent.local_telemetry()
        gossip = agent.gossip
        views = []
        for n in agent.state.nodes.values():
            view = node_view(n, agent.state, roles.get(n.node_id, ""))
            view["gossip"] = gossip.node_view(n.node_id)
            if n.node_id == agent.node_id:
                view["telemetry"] = telemetry
            else:
                view["telemetry"] = gossip.telemetry(n.node_id)
            views.append(view)
        return {"nodes": views, "gossip": gossip.summary(set(agent.state.nodes))}

    @app.get("/api/v1/runs")
    async def list_runs(_: Auth, __: Read, all: bool = False) -> dict[str, Any]:
        return {
            "runs": [run_view(r, agent.state) for r in agent.state.list_runs(include_finished=all)]
        }

    @app.get("/api/v1/runs/{name}")
    async def get_run(name: str, _: Auth, __: Read) -> dict[str, Any]:
        run = agent.state.runs.get(name)
        if run is None:
            raise Problem(
                404, "run not found", f"no run named {name!r}; see meshgpu ps -a", "not_found"
            )
        return run_view(run, agent.state)

    @app.post("/api/v1/runs", status_code=201)
    async def submit(body: SubmitBody, _: Auth) -> JSONResponse:
        run = await agent.submit(body)
        return JSONResponse(run_view(run, agent.state), status_code=201)

    @app.post("/api/v1/runs/{name}/stop")
    async def stop(name: str, body: StopBody, _: Auth) -> dict[str, Any]:
        run = await agent.stop(name, body.abort)
        return run_view(run, agent.state)

    @app.post("/api/v1/code", status_code=201)
    async def upload_code(request: Request, _: Auth) -> dict[str, Any]:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > agent.settings.code_limit:
                raise Problem(
                    413,
                    "code archive too large",
                    f"over the {agent.settings.code_limit} byte limit",
                    "too_large",
                )
        sha = await agent.store_code(bytes(data), request.headers.get("x-content-sha256"))
        return {"sha256": sha, "size": len(data)}

    @app.get("/api/v1/runs/{name}/logs")
    async def logs(
        request: Request, name: str, _: Auth, job: int = 0, follow: Annotated[bool, Query()] = False
    ) -> StreamingResponse:
        run = agent.state.runs.get(name)
        if run is None:
            raise Problem(404, "run not found", f"no run named {name!r}", "not_found")
        jobs = agent.state.run_jobs(run)
        if not 0 <= job < len(jobs):
            raise Problem(
                404, "job not found", f"run {name!r} has jobs 0..{len(jobs) - 1}", "not_found"
            )
        target = jobs[job]
        owner = agent.state.nodes.get(target.node_id) if target.node_id else None
        if owner is not None and target.node_id != agent.node_id and owner.api_url:
            # The log lives on the host that ran the job: stream it through from there.
            auth_header = request.headers.get("authorization", "")
            return StreamingResponse(
                agent.proxy_logs(owner.api_url, name, job, follow, auth_header),
                media_type="text/plain",
            )
        return StreamingResponse(agent.stream_logs(target.job_id, follow), media_type="text/plain")

    return app


__all__ = ["APPLIED_HEADER", "create_app"]
