"""``GET /api/v1/runs/{name}/ssh`` (WebSocket): the tunnel ``meshgpu ssh-proxy`` opens through
any node to the SSH server of the host that runs the job, and relays bytes both ways.

The bearer token is checked by the API's guard before the upgrade. Everything that can go wrong
before the first byte (no such run or job, a job that ended or has not started, a host that
serves no SSH or cannot be reached) is answered as a plain HTTP problem instead of the upgrade
(the WebSocket denial response), so the client can print it and exit. After the upgrade the
relay is lean: binary messages are written to the TCP stream as they come, and what the SSH
server sends goes out in messages of up to ``CHUNK`` bytes, with backpressure both ways
(hypercorn's bounded queue towards us, ``send_all`` towards the server).

That WebSocket is the old way (kept for clients that speak only it). ``meshgpu ssh-proxy`` asks
the API port's front (``meshgpu/api/front.py``) for ``Upgrade: meshgpu-ssh/1`` instead: the same
request and the same checks in the same order (the bearer token, the job, the connection to its
host's SSH server; a refusal is the same problem document, with ``Meshgpu-Tunnel: 1`` so the
client knows it reached a node that speaks it), then ``101`` and a plain byte stream both ways
(``RawTunnel``): no framing, large reads, the TLS stream's own ends (close_notify) for the
ends of the stream."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import trio

from meshgpu import errors
from meshgpu.api import problems

if TYPE_CHECKING:
    from meshgpu.api.front import Head
    from meshgpu.devenv.tunnel import Tunnels

log = logging.getLogger(__name__)

PATH = "/api/v1/runs/{name}/ssh"
CHUNK = 1 << 18  # the most one read from the SSH server carries (one WebSocket message)
NORMAL_CLOSURE, GOING_AWAY = 1000, 1001
UPGRADE = b"meshgpu-ssh/1"  # the plain byte stream's upgrade token
MARK = (b"Meshgpu-Tunnel", b"1")  # on every answer to an UPGRADE request: "a node that speaks it"


class TunnelEndpoint:
    """The route's ASGI app (a WebSocket route of the API's router)."""

    def __init__(self, tunnels: Tunnels, authenticated: str, principal: str = "") -> None:
        self.tunnels = tunnels
        self.authenticated = authenticated  # the scope key the guard sets
        self.principal = principal  # the scope key of the caller (policy checks)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not scope.get(self.authenticated):  # the guard answers first; never relay without
            await deny(scope, receive, send, problems.unauthorized())
            return
        name = scope["path_params"]["name"]
        try:
            job = _job_param(scope.get("query_string", b""))
            target = self.tunnels.target(name, job, scope.get(self.principal))
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


class RawTunnel:
    """``Upgrade: meshgpu-ssh/1`` on the API port, answered by its front (not hypercorn): the
    token checked as the API's guard checks it, then the job's host's SSH server connected,
    then ``101`` and bytes both ways. Every refusal is the problem document the WebSocket route
    answers with, before any SSH byte."""

    def __init__(
        self, tunnels: Tunnels, token_ok: Callable[[str], Any], ingress_domain: bytes | None
    ) -> None:
        """``token_ok``: the caller of a token (a ``Principal``; None or False: no valid
        token)."""
        self.tunnels, self.token_ok, self.domain = tunnels, token_ok, ingress_domain

    def claim(self, head: Head) -> Callable[[Head, trio.abc.Stream], Awaitable[None]] | None:
        """This tunnel's handler, unless ``head`` is a request for a service's own host
        (``<run>.<domain>``: the ingress's, whatever its path)."""
        if self.domain is not None:
            from meshgpu.services.routing import BadRequest, host_of, run_from_host

            try:
                host = host_of(head.headers)
                if host and run_from_host(host, self.domain) is not None:
                    return None
            except BadRequest:
                return None  # hypercorn and the ingress answer it (400)
        return self.handle

    async def handle(self, head: Head, client: trio.abc.Stream) -> None:
        token = problems.bearer_token((head.header(b"authorization") or b"").decode("latin-1"))
        who = self.token_ok(token) if token else None
        if not who:
            await answer_problem(client, problems.unauthorized())
            return
        try:
            job = _job_param(head.query)
            target = self.tunnels.target(head.name, job, who if who is not True else None)
            server = await self.tunnels.connect(target)
        except errors.MeshError as e:
            await answer_problem(client, problems.from_error(e))
            return
        except problems.Problem as p:
            await answer_problem(client, p)
            return
        async with server:
            try:
                await client.send_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: %s\r\nConnection: Upgrade\r\n"
                    b"%s: %s\r\n\r\n" % (UPGRADE, *MARK)
                )
                if head.rest:
                    await server.send_all(head.rest)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await relay_bytes(client, server)


async def relay_bytes(client: trio.abc.Stream, server: trio.SocketStream) -> None:
    """Bytes both ways until either side ends, then both closed: the SSH server sees the
    client's end as a closed connection; the client sees the server's as the TLS stream's
    close (close_notify), which it tells from a broken connection."""

    async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, cancel: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(CHUNK):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        cancel.cancel()

    with trio.CancelScope() as cancel:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, server, cancel)
            nursery.start_soon(pump, server, client, cancel)
    with trio.move_on_after(1.0) as closing:
        closing.shield = True
        try:
            await client.aclose()  # TLS: close_notify, the normal end
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def answer_problem(client: trio.abc.Stream, p: problems.Problem) -> None:
    """A refusal as an HTTP/1.1 answer (then the connection closes)."""
    response = problems.problem_response(
        p.status, p.title, p.detail, p.code, headers=p.headers, **p.extra
    )
    reason = HTTPStatus(p.status).phrase.encode() if p.status in _STATUSES else b""
    lines = [b"HTTP/1.1 %d %s" % (p.status, reason)]
    lines += [b"%s: %s" % kv for kv in response.raw_headers]
    lines += [b"%s: %s" % MARK, b"Connection: close"]
    try:
        await client.send_all(b"\r\n".join(lines) + b"\r\n\r\n" + response.body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


_STATUSES = frozenset(s.value for s in HTTPStatus)


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


__all__ = [
    "CHUNK",
    "MARK",
    "PATH",
    "UPGRADE",
    "RawTunnel",
    "TunnelEndpoint",
    "answer_problem",
    "deny",
    "relay",
    "relay_bytes",
]
