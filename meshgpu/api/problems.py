"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class Problem(Exception):
    """Raise from a handler: becomes ``application/problem+json`` with this status."""

    def __init__(
        self, status: int, title: str, detail: str = "", code: str = "", **extra: Any
    ) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail, self.code, self.extra = (
            status,
            title,
            detail,
            code,
            extra,
        )


def problem_response(
    status: int, title: str, detail: str = "", code: str = "", **extra: Any
) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if code:
        body["code"] = code
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.title, exc.detail, exc.code, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(exc.status_code, str(exc.detail), "")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()
        ]
        detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors)
        return problem_response(422, "invalid request", detail, "invalid_request", errors=errors)


def parse_run_config(text: str, filename: str, status: int, not_a_run: str) -> Any:
    """A run configuration (task, service, dev-environment) from a request's YAML, or a
    problem with every located issue (``status``; ``not_a_run`` says what to do instead when the
    file is another kind)."""
    from meshgpu.config import ConfigError, parse_config
    from meshgpu.config.runs import BaseRunConfiguration

    try:
        config = parse_config(text, filename)
    except ConfigError as e:
        raise Problem(
            status,
            "invalid configuration",
            str(e),
            "invalid_config",
            issues=[i.to_dict() for i in e.issues],
        ) from None
    if not isinstance(config, BaseRunConfiguration):
        raise Problem(
            status,
            f"{config.type} configurations are not runs",
            not_a_run.format(type=config.type),
            "not_a_run",
        )
    return config
