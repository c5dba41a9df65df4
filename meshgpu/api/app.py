"""The REST API every node serves: FastAPI, run in-process by ``hypercorn.trio.serve``."""

from contextlib import aclosing
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import WebSocketRoute

from meshgpu.api import access, fleets, metrics, offers, problems, sshkeys, tunnel, ui, views
from meshgpu.api.problems import Problem
from meshgpu.api.views import node_view, run_summary, run_view
from meshgpu.client.http import MEMBERS_HEADER
from meshgpu.config.common import EnvOverrides, Utf8Str
from meshgpu.devenv.tunnel import Tunnels
from meshgpu.errors import Denied
from meshgpu.runner.code import valid_sha256
from meshgpu.security import policy
from meshgpu.security.policy import Principal
from meshgpu.services.ingress import Ingress

if TYPE_CHECKING:
    from meshgpu.ops import Services  # noqa: F401

MAX_JSON_BODY = 1 << 20
# Answered without a bearer token: liveness, a new host's join (its token proof is the
# credential) and the cluster CA it checks first, and the API's description. Everything else is
# checked before its body is read.
# The agent file's download is authorized by its own secret (``X-Meshgpu-Download``), not the
# API token: a new instance has only what its user data carries (``api/fleets.py``).
AGENT_FILE_PATH = "/api/v1/agent/meshgpu.pyz"
PUBLIC_PATHS = frozenset(
    {"/healthz", "/api/v1/join", "/api/v1/join/ca", "/openapi.json", AGENT_FILE_PATH}
)
AUTHENTICATED = "meshgpu.authenticated"  # set in the ASGI scope once the token checked out
PRINCIPAL = "meshgpu.principal"  # who the token is (``meshgpu/security/policy.py``), likewise
PROJECT_HEADER = "X-Meshgpu-Project"
DEFAULT_PROJECT = "main"
BEARER_DOC = "The cluster's API token (~/.meshgpu/client.toml)"
ARCHIVE_BODY = {  # a code archive's body (read as it streams, not as a parameter)
    "requestBody": {
        "required": True,
        "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
    }
}
DEFAULT_TOKEN_TTL_S = 86400.0
MAX_TOKEN_TTL_S = 366 * 86400.0
APPLIED_HEADER = "X-Meshgpu-Applied-Index"
APPLIED_HEADER_B = APPLIED_HEADER.lower().encode()
MEMBERS_HEADER_B = MEMBERS_HEADER.lower().encode()


class SubmitBody(BaseModel):
    config: str = Field(description="The configuration file's text (YAML)")
    filename: Utf8Str = "<config>"
    name: Utf8Str | None = None
    run_args: list[Utf8Str] = Field(default_factory=list)
    code_sha256: str | None = None
    request_id: str = Field(min_length=8, max_length=128, description="Idempotency key")
    env: EnvOverrides = Field(
        default_factory=dict,
        description="Values for env sentinels, -e overrides (one variable within 128 KiB, "
        "all within 1 MiB)",
    )
    gpu: Utf8Str | None = Field(default=None, description="Override resources.gpu (the --gpu flag)")
    in_place: bool = Field(
        default=False,
        description="If an active run has this name and the configuration differs only in "
        "priority (or, for a dev environment, inactivity_duration), change them instead "
        "(answered 200 with updated_in_place)",
    )


class StopBody(BaseModel):
    abort: bool = False


class RunUpdate(BaseModel):
    """What may change in an active run without a restart (dstack: ``priority``)."""

    model_config = ConfigDict(extra="forbid")
    priority: int = Field(ge=0, le=100, description="The run's new priority, 0..100")


class _TooLarge(Exception):
    """Raised into the app by ``receive`` once a request body has passed its limit."""


class _Guard:
    """What every request meets before the app: the bearer token checked (all but
    ``PUBLIC_PATHS``) before a byte of the body is read; the body held to its limit as it
    streams in, declared (Content-Length) or not (chunked), answered 413 the moment it passes;
    and every response stamped with the applied index it was read at. Authentication cannot
    wait for the routes' ``auth`` dependency: FastAPI reads and parses a body before it runs a
    route's dependencies. Plain ASGI: Starlette's ``BaseHTTPMiddleware`` costs a task group and
    a stream per request, a tenth of a submission's time."""

    def __init__(self, app: Any, services: "Services") -> None:  # noqa: UP037
        self.app = app
        self.cluster = services.cluster
        self.code_limit = services.code.limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        cluster = self.cluster
        path = scope["path"]

        async def send_with_index(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    *message.get("headers", ()),
                    (APPLIED_HEADER_B, b"%d" % cluster.applied),
                ]
                # Where a client can go when this node does not answer: only on answers to
                # authenticated API calls (not to anyone who asks /healthz or fails a token).
                if message.get("status", 500) < 400 and path.startswith(
                    ("/api/v1/runs", "/api/v1/status", "/api/v1/nodes")
                ):
                    members = cluster.members_header()
                    if members:
                        headers.append((MEMBERS_HEADER_B, members))
                message = {**message, "headers": headers}
            await send(message)

        if ui.is_ui(path):
            # The console: its own sign-in (an HttpOnly cookie) and CSRF header (api/ui.py).
            refusal = ui.guard(scope, cluster.api_token_ok)
            if refusal is not None:
                await refusal(scope, receive, send_with_index)
                return
            scope[AUTHENTICATED] = True
            cookie = ui.cookie_token(scope["headers"])
            scope[PRINCIPAL] = cluster.principal(cookie) if cookie else None
        elif path not in PUBLIC_PATHS:
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            token = problems.bearer_token(header.decode("latin-1"))
            who = cluster.principal(token) if token else None
            if who is None:
                e = problems.unauthorized()
                response = problems.problem_response(
                    e.status, e.title, e.detail, e.code, headers=e.headers
                )
                await response(scope, receive, send_with_index)
                return
            scope[AUTHENTICATED] = True
            scope[PRINCIPAL] = who

        limit = self.code_limit + (64 << 10) if path.startswith("/api/v1/code") else MAX_JSON_BODY
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            await _too_large(f"{int(length)} bytes is over the {limit} byte limit")(
                scope, receive, send_with_index
            )
            return

        received = 0
        tripped = started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received, tripped
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    tripped = True
                    raise _TooLarge
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if tripped:
                return  # what the app makes of a body it could not finish: the 413 instead
            started = started or message["type"] == "http.response.start"
            await send_with_index(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not tripped:
                raise
        if tripped and not started:
            await _too_large(f"the body is over the {limit} byte limit")(
                scope, receive, send_with_index
            )

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A WebSocket (the SSH tunnel): the token checked before the upgrade; refused with
        the same 401 problem an HTTP request gets (the WebSocket denial response)."""
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        token = problems.bearer_token(header.decode("latin-1"))
        who = self.cluster.principal(token) if token else None
        if who is None:
            e = problems.unauthorized()
            await tunnel.deny(scope, receive, send, e)
            return
        scope[AUTHENTICATED] = True
        scope[PRINCIPAL] = who
        await self.app(scope, receive, send)


class _IngressHook:
    """The ingress in front of the API (``meshgpu/services/ingress.py``): service and model
    requests never reach FastAPI or the API token check."""

    def __init__(self, app: Any, services: "Services") -> None:  # noqa: UP037
        if services.ingress is None:
            services.ingress = Ingress(
                services.state, services.node_id, services.cluster.project_token_ok
            )
        self.handle = services.ingress.handle
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.handle(scope, receive, send, self.app)


def _too_large(detail: str) -> Any:
    return problems.problem_response(413, "request too large", detail, "too_large")


def create_app(services: "Services") -> FastAPI:  # noqa: UP037 - annotations are evaluated
    """The app over the use cases (``meshgpu/ops``): routes parse, call one, and render."""
    app = FastAPI(title="meshgpu", version="0.1.0", docs_url=None, redoc_url=None)
    problems.install(app)
    cluster, state, runs = services.cluster, services.state, services.runs

    app.add_middleware(_Guard, services=services)
    # The ingress answers /proxy/... (and <run>.<domain>) before the guard: it does its own auth.
    app.add_middleware(_IngressHook, services=services)

    bearer = HTTPBearer(scheme_name="bearer", auto_error=False, description=BEARER_DOC)

    async def auth(
        request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Principal:
        """The caller, by its bearer token; ``_Guard`` checked it before the body was read (the
        dependency documents it in /openapi.json, and holds a route to it wherever the app is
        served)."""
        who = request.scope.get(PRINCIPAL)
        if who is not None:
            return who  # type: ignore[no-any-return]
        token = problems.bearer_token(request.headers.get("authorization", ""))
        who = cluster.principal(token) if token else None
        if who is None:
            raise problems.unauthorized()
        return who

    def see_run(who: Principal, name: str, action: str = "project.read") -> Any:
        """The run, if the caller may see its project (else 404, as for no such run) and do
        ``action`` there (else 403): the policy's answer (``meshgpu/ops/access.py``)."""
        if services.access is None:
            return runs.get(name)
        return services.access.see_run(who, name, action)

    def require_global(who: Principal, action: str) -> None:
        if not policy.allowed_global(who, action):
            raise Denied("not allowed", f"{who.user} is no global admin", "forbidden")

    ProjectHeader = Annotated[
        str | None,
        Header(
            alias=PROJECT_HEADER,
            max_length=40,
            description="The project (the client profile's; default main)",
        ),
    ]

    async def consistent_read(consistent: bool = False) -> None:
        if consistent:
            await cluster.read_index()

    Auth = Annotated[Principal, Depends(auth)]
    Read = Annotated[None, Depends(consistent_read)]

    @app.post("/api/v1/join", responses=problems.responses(400, 403, 409, 503, 507))
    async def join(request: Request) -> dict[str, Any]:
        """A new host asks to join; authenticated by the token's signature over the request
        (``meshgpu/mesh/join.py``), not a bearer token. Checked completely before anything is
        proposed."""
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
        return await services.admission.admit(body)

    @app.get("/api/v1/join/ca")
    async def join_ca() -> dict[str, Any]:
        """The cluster CA certificate, for a joining host to check against the fingerprint in
        its token before it trusts this API's certificate (public: it is no secret)."""
        return {"ca_pem": cluster.ca_pem(), "cluster_id": cluster.cluster_id()}

    @app.post("/api/v1/tokens", status_code=201, responses=problems.responses(403, 503, 507))
    async def create_token(
        who: Auth,
        ttl_s: Annotated[
            float,
            Query(
                ge=0,
                le=MAX_TOKEN_TTL_S,
                description="Seconds until the token expires (default a day); 0: never",
            ),
        ] = DEFAULT_TOKEN_TTL_S,
        reusable: Annotated[
            bool, Query(description="Let many hosts join with it (default: single-use)")
        ] = False,
    ) -> dict[str, Any]:
        require_global(who, "cluster.manage")
        token = await services.tokens.create(ttl_s or None, reusable=reusable)
        return {
            "token": token,
            "token_id": token.split(".")[3],
            "expires_in_s": ttl_s or None,
            "reusable": reusable,
        }

    @app.delete("/api/v1/tokens/{token_id}", responses=problems.responses(403, 404, 503, 507))
    async def revoke_token(token_id: str, who: Auth) -> dict[str, Any]:
        require_global(who, "cluster.manage")
        await services.tokens.revoke(token_id)
        return {"revoked": token_id}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "node": services.node_name}

    @app.get("/api/v1/status")
    async def status(_: Auth, __: Read) -> dict[str, Any]:
        return cluster.status()

    Limit = Annotated[
        int,
        Query(ge=1, le=views.MAX_LIMIT, description=f"At most this many (<= {views.MAX_LIMIT})"),
    ]
    Cursor = Annotated[
        str | None,
        Query(max_length=1024, description="The next_cursor of the page before; none: the first"),
    ]

    @app.get("/api/v1/nodes", response_model=views.NodePage)
    async def nodes(
        _: Auth, __: Read, limit: Limit = views.DEFAULT_LIMIT, cursor: Cursor = None
    ) -> JSONResponse:
        """The replicated records, newest first, a page at a time; each with this node's
        gossip view of the host (``gossip``: alive/suspect/dead/left, load, reported GPU faults;
        ``null`` when gossip does not know it) and live ``telemetry`` (sampled now for this
        host, from gossip for peers)."""
        after = views.decode_cursor("nodes", cursor) if cursor else None
        found, last = views.page(state.nodes.values(), views.node_key, limit, after)
        roles = cluster.roles()
        gossip = services.gossip
        rows = []
        for n in found:
            view = node_view(n, state, roles.get(n.node_id, ""))
            view["gossip"] = gossip.node_view(n.node_id)
            if n.node_id == services.node_id:
                view["telemetry"] = await services.local_telemetry()
            else:
                view["telemetry"] = gossip.telemetry(n.node_id)
            rows.append(view)
        return JSONResponse(
            {
                "nodes": rows,
                "gossip": gossip.summary(set(state.nodes)),
                "next_cursor": views.encode_cursor("nodes", last) if last else None,
            }
        )

    @app.get("/api/v1/runs", response_model=views.RunPage)
    async def list_runs(
        who: Auth,
        __: Read,
        project: ProjectHeader = None,
        all: Annotated[bool, Query(description="Finished runs too (else active only)")] = False,
        limit: Limit = views.DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> JSONResponse:
        """Runs, newest first, a page at a time; without their configurations (``GET
        /api/v1/runs/{name}`` has it)."""
        after = views.decode_cursor("runs", cursor) if cursor else None
        acc = cluster.cluster.access
        seen = set(policy.visible_projects(acc, who)) if not who.is_admin else None
        found_runs = [
            r
            for r in state.runs.values()
            if (project is None or r.project == project) and (seen is None or r.project in seen)
        ]
        if not all:
            found_runs = [r for r in found_runs if not r.status.is_finished()]
        found, last = views.page(found_runs, views.run_key, limit, after)
        return JSONResponse(
            {
                "runs": [run_summary(r, state, services.rates) for r in found],
                "next_cursor": views.encode_cursor("runs", last) if last else None,
            }
        )

    @app.get("/api/v1/runs/{name}", response_model=views.RunView, responses=problems.responses(404))
    async def get_run(name: str, who: Auth, __: Read) -> JSONResponse:
        """One run with its configuration."""
        return JSONResponse(run_view(see_run(who, name), state, services.rates))

    @app.post(
        "/api/v1/runs",
        status_code=201,
        response_model=views.SubmittedRun,
        responses={
            200: {
                "description": "An active run of that name differed only in priority or a dev "
                "environment's inactivity_duration (or is a service): it was updated in place "
                "(in_place)",
                "model": views.SubmittedRun,
            },
            **problems.responses(403, 404, 409, 503, 507),
        },
    )
    async def submit(body: SubmitBody, who: Auth, project: ProjectHeader = None) -> JSONResponse:
        where = project or DEFAULT_PROJECT
        if services.access is not None:
            services.access.require(who, "run.submit", where)
        run, updated = await runs.submit(body, project=where, user=who.user)
        if updated is not None:
            view = run_view(run, state, services.rates) | {"updated_in_place": updated}
            return JSONResponse(view, status_code=200)
        return JSONResponse(run_view(run, state, services.rates), status_code=201)

    @app.patch(
        "/api/v1/runs/{name}",
        response_model=views.RunView,
        responses=problems.responses(403, 404, 409, 503, 507),
    )
    async def update_run(name: str, body: RunUpdate, who: Auth) -> JSONResponse:
        see_run(who, name, "run.stop")
        run = await runs.set_priority(name, body.priority)
        return JSONResponse(run_view(run, state, services.rates))

    @app.post(
        "/api/v1/runs/{name}/stop",
        response_model=views.RunView,
        responses=problems.responses(403, 404, 503, 507),
    )
    async def stop(name: str, body: StopBody, who: Auth) -> JSONResponse:
        see_run(who, name, "run.stop")
        run = await runs.stop(name, body.abort, by=who.user)
        return JSONResponse(run_view(run, state, services.rates))

    async def read_archive(request: Request) -> bytes:
        data = bytearray()
        async with aclosing(request.stream()) as stream:
            async for chunk in stream:
                data += chunk
                if len(data) > services.code.limit:
                    raise services.code.too_large()
        return bytes(data)

    @app.post(
        "/api/v1/code",
        status_code=201,
        openapi_extra=ARCHIVE_BODY,
        responses=problems.responses(400, 507),
    )
    async def upload_code(
        request: Request,
        _: Auth,
        x_content_sha256: Annotated[
            str | None, Header(description="The archive's SHA-256: checked before storing")
        ] = None,
    ) -> dict[str, Any]:
        """An uploaded working directory; copied to other members before the answer, which
        names them (``copies``)."""
        data = await read_archive(request)
        sha, holders = await services.code.store_upload(data, x_content_sha256)
        return {"sha256": sha, "size": len(data), "copies": holders}

    @app.put(
        "/api/v1/code/{sha}", openapi_extra=ARCHIVE_BODY, responses=problems.responses(400, 507)
    )
    async def put_code(sha: str, request: Request, _: Auth) -> dict[str, Any]:
        """A copy of an upload, pushed by the member that accepted it (stored, not copied on)."""
        data = await read_archive(request)
        if not valid_sha256(sha):
            raise Problem(
                400, "bad archive name", f"{sha!r} is not a SHA-256 (64 hex digits)", "bad_sha"
            )
        await services.code.put(data, sha)
        return {"sha256": sha, "size": len(data)}

    @app.get(
        "/api/v1/code/{sha}",
        response_class=FileResponse,
        responses={
            200: {
                "description": "The archive (tar.gz)",
                "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
            },
            **problems.responses(404),
        },
    )
    async def get_code(sha: str, _: Auth) -> FileResponse:
        """An archive this node holds (a host about to run a job fetches it); 404 otherwise."""
        return FileResponse(services.code.path(sha), media_type="application/gzip")

    @app.get(
        "/api/v1/runs/{name}/logs",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "The job's output as it was written (streamed: with follow, "
                "until the job ends)",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **problems.responses(404),
        },
    )
    async def logs(
        name: str, who: Auth, job: int = 0, follow: Annotated[bool, Query()] = False
    ) -> StreamingResponse:
        see_run(who, name)
        source = services.logs.source(name, job)
        if source.node_id is not None:
            # The log lives on the host that ran the job: streamed through from there, over
            # the peer port (members trust each other's certificates, not the caller's token).
            return StreamingResponse(
                services.logs.proxy(source.node_id, name, job, follow), media_type="text/plain"
            )
        return StreamingResponse(
            services.logs.stream_local(source.job.job_id, follow), media_type="text/plain"
        )

    if services.tunnels is None:
        services.tunnels = Tunnels(state, services.node_id)
    if services.tunnels.may_attach is None:
        services.tunnels.may_attach = lambda who, project: policy.allowed(
            cluster.cluster.access, who, "run.attach", project
        )
    # ssh-proxy's tunnel (a WebSocket): plain ASGI, the guard checked the token before it.
    app.router.routes.append(
        WebSocketRoute(
            tunnel.PATH, tunnel.TunnelEndpoint(services.tunnels, AUTHENTICATED, PRINCIPAL)
        )
    )

    app.include_router(offers.router(services, Auth, Read))
    app.include_router(metrics.router(services, Auth, Read))
    app.include_router(sshkeys.router(services, Auth, Read))
    app.include_router(fleets.router(services, Auth, Read, ProjectHeader))
    app.include_router(access.router(services, Auth, Read))
    app.include_router(ui.router(services, PRINCIPAL))  # the console (not in /openapi.json)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problems.document(FastAPI.openapi(app), PUBLIC_PATHS)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


__all__ = ["APPLIED_HEADER", "create_app"]
