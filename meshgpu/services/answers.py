"""What the ingress answers itself: RFC 9457 problems (the API's shape,
``meshgpu/api/problems.py``) and OpenAI-style errors on the model endpoint."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
PROBLEM = b"application/problem+json"


def error_body(
    message: str, code: str, param: str | None, kind: str = "invalid_request_error"
) -> bytes:
    """An OpenAI API error (what its clients parse)."""
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}
    ).encode()


async def problem(
    scope: Scope,
    send: Send,
    status: int,
    title: str,
    detail: str,
    code: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """An RFC 9457 problem (the API's shape, ``meshgpu/api/problems.py``)."""
    body = json.dumps(
        {"type": "about:blank", "title": title, "status": status, "detail": detail, "code": code}
    ).encode()
    await respond(scope, send, status, body, PROBLEM, headers)


async def respond(
    scope: Scope,
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    all_headers = [
        (b"content-type", content_type),
        (b"content-length", b"%d" % len(body)),
        *(headers or ()),
    ]
    if scope["type"] == "websocket":
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send(
                {"type": "websocket.http.response.start", "status": status, "headers": all_headers}
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def unauthorized(scope: Scope, send: Send, openai: bool = False) -> None:
    detail = "send Authorization: Bearer <token> (the cluster's API token)"
    headers = [(b"www-authenticate", b'Bearer realm="meshgpu"')]
    if openai:
        await respond(
            scope, send, 401, error_body(detail, "invalid_api_key", None), headers=headers
        )
    else:
        await problem(scope, send, 401, "unauthorized", detail, "unauthorized", headers)


__all__ = ["PROBLEM", "error_body", "problem", "respond", "unauthorized"]
