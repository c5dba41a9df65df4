"""``GET /api/v1/runs/{name}/ssh`` (WebSocket): the tunnel ``meshgpu ssh-proxy`` opens through
any node to the SSH server of the host that runs the job, and relays bytes both ways.

The bearer token is checked by the API's guard before the upgrade. Everything that can go wrong
before the first byte (no such run or job, a job that ended or has not started, a host that
serves no SSH or cannot be reached) is answered as a plain HTTP problem instead of the upgrade
(the WebSocket denial response), so the client can print it and exit. After the upgrade the
relay is lean: binary messages are written to the TCP stream as they come, and what the SSH
server sends goes out in messages of up to ``CHUNK`` bytes, with backpressure both ways
(hypercorn's bounded queue towards us, ``send_all`` towards the server)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from meshgpu import errors
from meshgpu.api import problems

if TYPE_CHECKING:
    from meshgpu.devenv.tunnel import Tunnels

log = logging.getLogger(__name__)

PATH = "/api/v1/runs/{name}/ssh"
CHUNK = 1 << 18  # the most one read from the SSH server carries (one WebSocket message)
NORMAL_CLOSURE, GOING_AWAY = 1000, 1001


class TunnelEndpoint:
    """The route's ASGI app (a WebSocket route of the API's router)."""

    def __init__(self, tunnels: Tunnels, authenticated: str) -> None:
        self.tunnels = tunnels
        self.authenticated = authenticated  # the scope key the guard sets

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not scope.get(self.authenticated):  # the guard answers first; never relay without
            await deny(scope, receive, send, problems.unauthorized())
            return
        name = scope["path_params"]["name"]
        try:
            job = _job_param(scope.get("query_string", b""))
            target = self.tunnels.target(name, job)
            stream = await self.tunnels.connect(target)
        except errors.MeshError as e:
            await deny(scope, receive, send, problems.from_error(e))
            return
        except problems.Problem as p:
            await deny(scope, receive, send, p)
            return
        async with stream:
            message = await receive()
            if message["type"] != "websocket.connect":
                return
            await send({"type": "websocket.accept"})
            await relay(receive, send, stream)


async def relay(receive: Any, send: Any, stream: trio.SocketStream) -> None:
    """Bytes both ways until either side ends; then the other is closed (the SSH server sees
    the client's disconnect as a closed connection, and ends its sessions)."""
    server_closed = False

    async def upstream(cancel: trio.CancelScope) -> None:
        try:
            while True:
                message = await receive()
                if message["type"] != "websocket.receive":
                    break  # websocket.disconnect: the client is gone
                data = message.get("bytes")
                if data is None:
                    data = (message.get("text") or "").encode()
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        cancel.cancel()

    async def downstream(cancel: trio.CancelScope) -> None:
        nonlocal server_closed
        try:
            while True:
                data = await stream.receive_some(CHUNK)
                if not data:
                    break
                await send({"type": "websocket.send", "bytes": data})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        server_closed = True
        cancel.cancel()

    with trio.CancelScope() as cancel:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream, cancel)
            nursery.start_soon(downstream, cancel)
    if server_closed:
        # The SSH server hung up (the session ended, or the job did): a normal close.
        with trio.move_on_after(1.0):
            await send({"type": "websocket.close", "code": NORMAL_CLOSURE})


def _job_param(query: bytes) -> int | None:
    from urllib.parse import parse_qs

    values = parse_qs(query.decode("latin-1")).get("job")
    if not values:
        return None
    text = values[-1]
    if not text.isdigit() or len(text) > 6:
        raise problems.Problem(
            400, "invalid job", f"job must be a job number (0, 1, ...), not {text!r}", "invalid"
        )
    return int(text)


async def deny(scope: dict[str, Any], receive: Any, send: Any, p: problems.Problem) -> None:
    """Answer the upgrade request with a problem document (the WebSocket denial response)."""
    response = problems.problem_response(
        p.status, p.title, p.detail, p.code, headers=p.headers, **p.extra
    )
    if "websocket.http.response" in scope.get("extensions", {}):
        await response(scope, receive, send)
    else:  # a server without the extension: a 403 with no reason is all it can say
        await send({"type": "websocket.close", "code": 1008, "reason": p.title})


__all__ = ["CHUNK", "PATH", "TunnelEndpoint", "deny", "relay"]
