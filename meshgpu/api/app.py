"""The REST API every node serves: FastAPI, run in-process by ``hypercorn.trio.serve``."""

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from meshgpu.api import metrics, offers, problems
from meshgpu.api.problems import Problem
from meshgpu.api.views import node_view, run_view
from meshgpu.client.http import MEMBERS_HEADER
from meshgpu.runner.code import valid_sha256

if TYPE_CHECKING:
    from meshgpu.agent import Agent  # noqa: F401

MAX_JSON_BODY = 1 << 20
APPLIED_HEADER = "X-Meshgpu-Applied-Index"
APPLIED_HEADER_B = APPLIED_HEADER.lower().encode()
MEMBERS_HEADER_B = MEMBERS_HEADER.lower().encode()


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
    in_place: bool = Field(
        default=False,
        description="If an active run has this name and the configuration differs only in "
        "priority, change its priority instead (answered 200 with updated_in_place)",
    )


class StopBody(BaseModel):
    abort: bool = False


class RunUpdate(BaseModel):
    """What may change in an active run without a restart (dstack: ``priority``)."""

    model_config = ConfigDict(extra="forbid")
    priority: int = Field(ge=0, le=100, description="The run's new priority, 0..100")


class _LimitsAndIndex:
    """Refuse bodies over the limit before reading them, and stamp every response with the
    applied index it was read at. Plain ASGI: Starlette's ``BaseHTTPMiddleware`` costs a task
    group and a stream per request, a tenth of a submission's time."""

    def __init__(self, app: Any, agent: "Agent") -> None:  # noqa: UP037
        self.app = app
        self.agent = agent

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        agent = self.agent
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        limit = (
            agent.settings.code_limit + (64 << 10)
            if scope["path"].startswith("/api/v1/code")
            else MAX_JSON_BODY
        )
        if length is not None and length.isdigit() and int(length) > limit:
            response = problems.problem_response(
                413,
                "request too large",
                f"{int(length)} bytes is over the {limit} byte limit",
                "too_large",
            )
            await response(scope, receive, send)
            return

        async def send_with_index(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and agent.node is not None:
                headers = [
                    *message.get("headers", ()),
                    (APPLIED_HEADER_B, b"%d" % agent.node.applied),
                ]
                # Where a client can go when this node does not answer: only on answers to
                # authenticated API calls (not to anyone who asks /healthz or fails a token).
                if message.get("status", 500) < 400 and scope["path"].startswith(
                    ("/api/v1/runs", "/api/v1/status", "/api/v1/nodes")
                ):
                    members = agent.members_header()
                    if members:
                        headers.append((MEMBERS_HEADER_B, members))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_index)


def create_app(agent: "Agent") -> FastAPI:  # noqa: UP037 - annotations are evaluated (FastAPI)
    app = FastAPI(title="meshgpu", version="0.1.0", docs_url=None, redoc_url=None)
    problems.install(app)

    app.add_middleware(_LimitsAndIndex, agent=agent)

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
        run, updated = await agent.submit(body)
        if updated:
            view = run_view(run, agent.state) | {"updated_in_place": ["priority"]}
            return JSONResponse(view, status_code=200)
        return JSONResponse(run_view(run, agent.state), status_code=201)

    @app.patch("/api/v1/runs/{name}")
    async def update_run(name: str, body: RunUpdate, _: Auth) -> dict[str, Any]:
        run = await agent.set_priority(name, body.priority)
        return run_view(run, agent.state)

    @app.post("/api/v1/runs/{name}/stop")
    async def stop(name: str, body: StopBody, _: Auth) -> dict[str, Any]:
        run = await agent.stop(name, body.abort)
        return run_view(run, agent.state)

    async def read_archive(request: Request) -> bytes:
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
        return bytes(data)

    @app.post("/api/v1/code", status_code=201)
    async def upload_code(request: Request, _: Auth) -> dict[str, Any]:
        """An uploaded working directory; copied to other members before the answer, which
        names them (``copies``)."""
        data = await read_archive(request)
        sha, holders = await agent.store_code(data, request.headers.get("x-content-sha256"))
        return {"sha256": sha, "size": len(data), "copies": holders}

    def checked_sha(sha: str, status: int = 404) -> str:
        if not valid_sha256(sha):
            if status == 404:  # GET: no such archive here, whatever was asked
                raise Problem(404, "unknown code archive", f"{sha!r} is not a SHA-256", "not_found")
            raise Problem(
                status, "bad archive name", f"{sha!r} is not a SHA-256 (64 hex digits)", "bad_sha"
            )
        return sha

    @app.put("/api/v1/code/{sha}")
    async def put_code(sha: str, request: Request, _: Auth) -> dict[str, Any]:
        """A copy of an upload, pushed by the member that accepted it (stored, not copied on)."""
        data = await read_archive(request)
        await agent.put_code(data, checked_sha(sha, 400))
        return {"sha256": sha, "size": len(data)}

    @app.get("/api/v1/code/{sha}")
    async def get_code(sha: str, _: Auth) -> FileResponse:
        """An archive this node holds (a host about to run a job fetches it); 404 otherwise."""
        if not agent.code.has(checked_sha(sha)):
            raise Problem(404, "unknown code archive", f"this node has no {sha}", "not_found")
        return FileResponse(agent.code.path(sha), media_type="application/gzip")

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

    app.include_router(offers.router(agent, Auth, Read))
    app.include_router(metrics.router(agent, Auth, Read))
    return app


__all__ = ["APPLIED_HEADER", "create_app"]
