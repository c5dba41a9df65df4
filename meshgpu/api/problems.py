"""RFC 9457 problem details for every error the API returns, and the OpenAPI document that
says so (``document``)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from consensus.core.errors import ProposalDropped
from consensus.node import Timeout as ConsensusTimeout
from consensus.storage import StorageFull
from meshgpu import errors

MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """Raise from a handler: becomes ``application/problem+json`` with this status."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        code: str = "",
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail, self.code, self.extra = (
            status,
            title,
            detail,
            code,
            extra,
        )
        self.headers = headers


def problem_response(
    status: int,
    title: str,
    detail: str = "",
    code: str = "",
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if code:
        body["code"] = code
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


UNAUTHORIZED_DETAIL = "send Authorization: Bearer <token> (see ~/.meshgpu/client.toml)"


def unauthorized() -> Problem:
    """401 for a request without the cluster's API token (RFC 7235: with ``WWW-Authenticate``)."""
    return Problem(
        401,
        "unauthorized",
        UNAUTHORIZED_DETAIL,
        "unauthorized",
        headers={"WWW-Authenticate": 'Bearer realm="meshgpu"'},
    )


def bearer_token(header: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, '' for any other. The scheme
    is case-insensitive (RFC 7235 section 2.1): ``bearer x`` and ``BEARER x`` carry ``x``."""
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def allowed_methods(app: Any, path: str) -> list[str]:
    """Every method some route of ``app`` answers at ``path`` (a 405's ``Allow``): Starlette
    names only the first route that matched the path, not the others at the same path."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods and route.path_regex.match(path):
            methods |= route.methods
    return sorted(methods)


# Each kind of use-case error and the status it is answered with: the one place they meet HTTP.
STATUS: dict[type[errors.MeshError], int] = {
    errors.Invalid: 400,
    errors.Denied: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.TooLarge: 413,
    errors.Unavailable: 503,
}


def status_of(exc: errors.MeshError) -> int:
    if isinstance(exc, errors.Remote):
        return exc.status
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]  # type: ignore[index]
    return 400


def from_error(exc: errors.MeshError, status: int | None = None) -> Problem:
    """The problem an error is answered with (``status``: another than its kind's own)."""
    return Problem(status or status_of(exc), exc.title, exc.detail, exc.code, **exc.extra)


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.MeshError)
    async def _error(_: Request, exc: errors.MeshError) -> JSONResponse:
        return problem_response(status_of(exc), exc.title, exc.detail, exc.code, **exc.extra)

    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status, exc.title, exc.detail, exc.code, headers=exc.headers, **exc.extra
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.url.path))
        return problem_response(exc.status_code, str(exc.detail), "", headers=headers or None)

    # A write the Raft log could not take now (no leader within the deadline, too much in
    # flight): the client may retry, here or at another member.
    @app.exception_handler(ConsensusTimeout)
    async def _timeout(_: Request, exc: ConsensusTimeout) -> JSONResponse:
        return problem_response(503, "not replicated in time", str(exc), "unavailable")

    @app.exception_handler(ProposalDropped)
    async def _dropped(_: Request, exc: ProposalDropped) -> JSONResponse:
        return problem_response(503, "not accepted by the log now", str(exc), "unavailable")

    # This node's disk cannot take the write (full, or under the reserve): reads still work.
    @app.exception_handler(StorageFull)
    async def _full(_: Request, exc: StorageFull) -> JSONResponse:
        return problem_response(507, "insufficient storage", str(exc), "insufficient_storage")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()
        ]
        detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors)
        return problem_response(422, "invalid request", detail, "invalid_request", errors=errors)


# -- the OpenAPI document ---------------------------------------------------------------------

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {
            "type": "string",
            "description": "Machine-readable: unauthorized, not_found, name_in_use, too_large, ...",
        },
        "errors": {
            "type": "array",
            "description": "422 for a malformed request: each parameter or field at fault",
            "items": {
                "type": "object",
                "properties": {"loc": {"type": "string"}, "msg": {"type": "string"}},
            },
        },
        "issues": {
            "type": "array",
            "description": "An invalid configuration: every located issue",
            "items": {"type": "object"},
        },
    },
    "additionalProperties": True,
}

STATUS_TEXT = {
    400: "Bad request (a body that is not JSON, a submission the configuration refuses)",
    401: "No valid bearer token",
    403: "Refused",
    404: "Not found",
    409: "Conflicts with the state (a name in use, a run that is not active)",
    413: "The request body is over the limit",
    422: "Invalid parameters or body",
    503: "Unavailable now (no leader, no linearizable read, not replicated in time): retry",
    507: "This node's disk cannot take the write now (full): retry once space is freed",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route that can answer these problem statuses."""
    return {
        s: {
            "description": STATUS_TEXT[s],
            "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for s in statuses
    }


def document(schema: dict[str, Any], public: set[str] | frozenset[str]) -> dict[str, Any]:
    """Make FastAPI's generated document true to what the API answers. Every problem it can
    answer on every operation, as ``application/problem+json`` with the Problem schema: 401 for
    operations not in ``public`` (a bearer token, checked before anything else), 413 for all (a
    body over the limit, whatever the route), 400 for a JSON body that does not parse, 422 for
    invalid parameters or body (in place of FastAPI's ``HTTPValidationError``), 503 for a
    ``consistent`` read."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    schemes = components.setdefault("securitySchemes", {})
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            if method not in {"get", "put", "post", "delete", "patch", "head", "options"}:
                continue
            answers = op.setdefault("responses", {})
            wanted = [413]
            if path not in public:
                if not op.get("security"):
                    op["security"] = [{"bearer": []}]
                wanted.append(401)
            params = op.get("parameters") or []
            body = op.get("requestBody")
            if params or body:
                wanted.append(422)
                answers.pop("422", None)  # FastAPI's application/json HTTPValidationError
            if body and "application/json" in body.get("content", {}):
                wanted.append(400)
            if any(p.get("name") == "consistent" and p.get("in") == "query" for p in params):
                wanted.append(503)
            for status, doc in responses(*wanted).items():
                answers.setdefault(str(status), doc)
    if any(op.get("security") for item in schema.get("paths", {}).values() for op in item.values()):
        schemes.setdefault(
            "bearer",
            {
                "type": "http",
                "scheme": "bearer",
                "description": "The cluster's API token (~/.meshgpu/client.toml)",
            },
        )
    if not schemes:
        components.pop("securitySchemes")
    for unused in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{unused}"' not in json.dumps(schema.get("paths", {})):
            schemas.pop(unused, None)
    return schema
