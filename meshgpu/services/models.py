"""The OpenAI-compatible model endpoint every node serves at ``/proxy/models/<project>/``
(dstack's base URL): ``GET models`` lists the project's running services that declare
``model:``; ``POST chat/completions``, ``completions`` and ``embeddings`` are routed by the
body's ``model`` to the service whose ``model.name`` matches and forwarded to
``<model.prefix>/<same path>`` on one of its replicas (streamed answers pass through), under
that service's ``auth``. ``format: tgi`` services are refused at submit (not converted)."""

from __future__ import annotations

import json
from typing import Any

from meshgpu.services.answers import error_body, respond, unauthorized
from meshgpu.services.routing import MODELS_PREFIX, BadRequest, Route, name_ok

MAX_BODY = 16 << 20  # a request's JSON (prompts, embedding inputs) is read whole to route it
FORWARDED = frozenset({b"/chat/completions", b"/completions", b"/embeddings"})


async def handle(ingress: Any, scope: dict[str, Any], receive: Any, send: Any, raw: bytes) -> None:
    """``ingress``: the ``Ingress`` (its routes, auth and proxy)."""
    project, _, rest = raw[len(MODELS_PREFIX) :].partition(b"/")
    if not name_ok(project):
        raise BadRequest("the path names no project: /proxy/models/<project>/")
    rest = b"/" + rest
    if rest.startswith(b"/v1/"):  # clients given .../models/main/v1 as their base URL
        rest = rest[3:]
    method = scope.get("method", "GET")
    if scope["type"] != "http":
        await respond(scope, send, 404, error_body("no websocket here", "not_found", None))
        return
    if rest == b"/models" and method in ("GET", "HEAD"):
        await _list(ingress, scope, send, project.decode())
    elif rest in FORWARDED and method == "POST":
        await _forward(ingress, scope, receive, send, project.decode(), rest)
    else:
        await respond(
            scope,
            send,
            404,
            error_body(
                f"{method} {rest.decode('latin-1')} is not served here: GET models, POST "
                "chat/completions, completions, embeddings",
                "not_found",
                None,
            ),
        )


def _served(ingress: Any, project: str) -> list[Route]:
    return [r for r in ingress.routes.services(project) if r.active and r.service.model is not None]


async def _list(ingress: Any, scope: dict[str, Any], send: Any, project: str) -> None:
    """Every model without auth, and those with it for a caller with a token."""
    authorized = ingress.authorized(scope, project)
    state = ingress.routes.state
    data = []
    for route in _served(ingress, project):
        if route.service.auth and not authorized:
            continue
        run = state.runs.get(route.run_name)
        data.append(
            {
                "id": route.service.model.name,
                "object": "model",
                "created": int(run.submitted_at) if run is not None else 0,
                "owned_by": project,
            }
        )
    await respond(scope, send, 200, json.dumps({"object": "list", "data": data}).encode())


async def _forward(
    ingress: Any, scope: dict[str, Any], receive: Any, send: Any, project: str, rest: bytes
) -> None:
    length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        await respond(
            scope, send, 413, error_body(f"the body is over {MAX_BODY} bytes", "too_large", None)
        )
        return
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            await respond(
                scope,
                send,
                413,
                error_body(f"the body is over {MAX_BODY} bytes", "too_large", None),
            )
            return
        if not message.get("more_body", False):
            break
    try:
        request = json.loads(body)
    except ValueError:
        request = None
    model = request.get("model") if isinstance(request, dict) else None
    if not isinstance(model, str) or not model:
        await respond(
            scope,
            send,
            400,
            error_body("the body must be a JSON object with a model", "invalid_request", "model"),
        )
        return
    route = next((r for r in _served(ingress, project) if r.service.model.name == model), None)
    if route is None:
        await respond(
            scope,
            send,
            404,
            error_body(
                f"the model {model!r} does not exist in project {project!r}",
                "model_not_found",
                "model",
            ),
        )
        return
    if route.service.auth and not ingress.authorized(scope, project):
        await unauthorized(scope, send, openai=True)
        return
    prefix = route.service.model.prefix.rstrip("/").encode()
    await ingress.proxy(scope, receive, send, route, prefix + rest, bytes(body))


__all__ = ["FORWARDED", "MAX_BODY", "handle"]
