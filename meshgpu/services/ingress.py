"""The ingress every agent serves on its API port: requests for a service, sent to any node,
reach a ready replica wherever it runs.

* ``/proxy/services/<project>/<run>/...`` and, with ``--ingress-domain D``, ``<run>.D``;
* ``/proxy/models/<project>/...``: the OpenAI-compatible model endpoint (``models.py``).

Plain ASGI in front of the API app (it answers before FastAPI sees the request, and does its own
auth: a service's ``auth: true`` takes the cluster's API token). Each request reads its route
from the replicated state (``routing.py``: rebuilt once per applied index), waits for a replica
when the service has none ready (scale-from-zero activation, bounded), applies the service's
rate limits, picks the replica with the fewest outstanding requests, and speaks HTTP/1.1 to it
over a pooled keep-alive connection (``upstream.py``), streaming both bodies. A connection that
cannot be made is retried on another replica; once a byte of the request may have reached an
app, never. WebSockets are relayed frame by frame (``wsproto`` toward the replica)."""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h11
import trio
import wsproto
import wsproto.events as wse

from meshgpu.services import models
from meshgpu.services.answers import PROBLEM, problem, unauthorized
from meshgpu.services.ingress_metrics import IngressMetrics
from meshgpu.services.ratelimit import RateLimiter, match, retry_after
from meshgpu.services.routing import (
    DEFAULT_PROJECT,
    MODELS_PREFIX,
    SERVICES_PREFIX,
    BadRequest,
    Replica,
    Route,
    RouteTable,
    Target,
    host_of,
    parse_path,
    run_from_host,
)
from meshgpu.services.stats import ServiceCounters
from meshgpu.services.upstream import READ_SIZE, Conn, ConnectFailed, Pool

if TYPE_CHECKING:
    from meshgpu.state import StateMachine

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

BODY_LIMIT = 64 << 20
UPSTREAM_TIMEOUT_S = 300.0  # dstack's proxy_read_timeout
MAX_WAITING = 1000  # requests held per service for activation
MAX_WS_MESSAGE = 64 << 20
SWEEP_S = 1.0
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    }
)
_WS_HEADERS = frozenset(
    {
        b"host",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"content-length",
    }
)


@dataclass(frozen=True, slots=True)
class IngressSettings:
    domain: str | None = None  # --ingress-domain: <run>.<domain> routes to the run
    activation_timeout_s: float = 300.0  # --activation-timeout
    max_waiting: int = MAX_WAITING
    body_limit: int = BODY_LIMIT
    upstream_timeout_s: float = UPSTREAM_TIMEOUT_S


class Aborted(Exception):
    """Raised into the server once a response has started and cannot be finished (a replica
    that died mid-stream): the client's connection is closed, its body left incomplete."""


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _UpstreamError(Exception):
    pass


class _Quiet(logging.Filter):
    """The server logs what an app raises with a traceback; an ``Aborted`` is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        return not isinstance(exc, Aborted)


_QUIET = _Quiet()


class Ingress:
    """The routing, auth, limits, activation and proxying of one agent. ``notify`` after each
    applied batch (``follow_applied``) wakes held requests; ``run`` drops idle connections to
    replicas that stopped receiving traffic."""

    def __init__(
        self,
        state: StateMachine,
        node_id: str,
        token_ok: Callable[[str], bool] | Callable[[str, str], bool],
        counters: ServiceCounters | None = None,
        settings: IngressSettings | None = None,
    ) -> None:
        self.settings = s = settings or IngressSettings()
        self.routes = RouteTable(state, node_id)
        self.token_ok = token_ok
        # (token, project) -> may read the project (the policy's); a one-argument one: any
        # valid token (a test's).
        self._per_project = len(inspect.signature(token_ok).parameters) >= 2
        self.counters = counters if counters is not None else ServiceCounters()
        self.pool = Pool()
        self.metrics = IngressMetrics()
        self.domain = s.domain.strip(".").lower().encode() if s.domain else None
        self._changed = trio.Event()
        self._waiting: dict[tuple[str, str], int] = {}
        self._limiters: dict[str, RateLimiter] = {}
        self._rr = 0
        logging.getLogger("hypercorn.error").addFilter(_QUIET)

    # -- wiring --------------------------------------------------------------------------------
    def notify(self, _index: int = 0) -> None:
        """The state moved on: wake held requests (routes are re-read lazily)."""
        self._changed.set()
        self._changed = trio.Event()

    async def run(self) -> None:
        """Close idle pooled connections to replicas that no longer receive traffic (a draining
        replica's host waits until none is established), on every state change and every
        ``SWEEP_S``; forget the rate-limit tables and metrics of runs that are gone."""
        while True:
            with trio.move_on_after(SWEEP_S):
                await self._changed.wait()
            self.pool.sweep(self.routes.addresses())
            runs = list(self.routes.state.runs.values())
            live = {r.run_id for r in runs}
            for run_id in [k for k in self._limiters if k not in live]:
                del self._limiters[run_id]
            self.counters.forget(live)
            self.metrics.forget({(r.project, r.run_name) for r in runs})

    def middleware(self, app: Any) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
            await self.handle(scope, receive, send, app)

        return asgi

    def waiting(self) -> dict[tuple[str, str], int]:
        return dict(self._waiting)

    def metric_families(self, node: str) -> list[Any]:
        return self.metrics.families(node, self._waiting)

    # -- dispatch ------------------------------------------------------------------------------
    async def handle(self, scope: Scope, receive: Receive, send: Send, app: Any) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await app(scope, receive, send)
            return
        raw = scope.get("raw_path") or scope["path"].encode()
        try:
            if self.domain is not None:
                host = host_of(scope["headers"])
                run = run_from_host(host, self.domain) if host else None
                if run is not None:
                    target = Target(DEFAULT_PROJECT, run.decode(), b"", raw)
                    await self._service(scope, receive, send, target)
                    return
            if not raw.startswith(b"/proxy/"):
                await app(scope, receive, send)
                return
            if self.domain is None:
                host_of(scope["headers"])  # malformed Host headers: 400 here too
            if raw.startswith(SERVICES_PREFIX):
                await self._service(scope, receive, send, parse_path(raw))
            elif raw.startswith(MODELS_PREFIX):
                await models.handle(self, scope, receive, send, raw)
            else:
                await problem(
                    scope,
                    send,
                    404,
                    "not found",
                    "ingress paths are /proxy/services/<project>"
                    "/<run>/ and /proxy/models/<project>/",
                    "not_found",
                )
        except BadRequest as e:
            await problem(scope, send, 400, "bad request", str(e), "bad_request")

    # -- services ------------------------------------------------------------------------------
    async def _service(self, scope: Scope, receive: Receive, send: Send, target: Target) -> None:
        route = self.routes.get(target.project, target.run)
        if route is None:
            await problem(
                scope,
                send,
                404,
                "no such service",
                f"project {target.project!r} has no service {target.run!r}",
                "no_such_service",
            )
            return
        if not await self.check_gone(scope, send, route):
            return
        service = route.service
        if service.auth and not self.authorized(scope, route.project):
            await unauthorized(scope, send)
            return
        if service.rate_limits and not await self.rate_limited_ok(scope, send, route, target.rest):
            return
        path = target.rest if service.strip_prefix else target.prefix + target.rest
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send, route, path)
        else:
            await self.proxy(scope, receive, send, route, path)

    async def check_gone(self, scope: Scope, send: Send, route: Route) -> bool:
        if route.stopping:
            await problem(
                scope, send, 503, "service stopping", f"{route.run_name} is stopping", "stopping"
            )
            return False
        if not route.active:
            await problem(
                scope,
                send,
                404,
                "service not running",
                f"{route.run_name} has finished",
                "not_running",
            )
            return False
        return True

    def authorized(self, scope: Scope, project: str) -> bool:
        """A bearer token whose user may read ``project`` (``meshgpu/security/policy.py``;
        ``token_ok`` takes the token and the project; a one-argument one, the token alone)."""
        for k, v in scope["headers"]:
            if k == b"authorization":
                scheme, _, token = v.decode("latin-1").strip().partition(" ")
                token = token.strip()
                if scheme.lower() != "bearer" or not token:
                    return False
                if self._per_project:
                    return bool(self.token_ok(token, project))  # type: ignore[call-arg]
                return bool(self.token_ok(token))  # type: ignore[call-arg]
        return False

    async def rate_limited_ok(self, scope: Scope, send: Send, route: Route, rest: bytes) -> bool:
        rule = match(route.service.rate_limits, rest.decode("latin-1"))
        if rule is None:
            return True
        if rule.key == "header":
            name = (rule.header or "").lower().encode()
            key = next((v.decode("latin-1") for k, v in scope["headers"] if k == name), "")
        else:
            client = scope.get("client")
            key = client[0] if client else ""
        limiter = self._limiters.get(route.run_id)
        if limiter is None:
            limiter = self._limiters[route.run_id] = RateLimiter()
        wait = limiter.take(rule, key, time.monotonic())
        if not wait:
            return True
        await problem(
            scope,
            send,
            429,
            "too many requests",
            f"over {rule.rps:g} requests/s (burst {rule.burst}) under {rule.prefix}",
            "rate_limited",
            headers=[(b"retry-after", retry_after(wait).encode())],
        )
        self.metrics.observe(route.project, route.run_name, 429, 0.0)
        return False

    async def ready_route(self, scope: Scope, send: Send, route: Route) -> Route | None:
        """``route`` with a ready replica, waiting for one while it has none (activation);
        None when answered already (503 queue full, 504 timed out, 404/503 gone)."""
        if route.replicas:
            return route
        key = (route.project, route.run_name)
        held = self._waiting.get(key, 0)
        if held >= self.settings.max_waiting:
            await problem(
                scope,
                send,
                503,
                "too many waiting",
                f"{held} requests already wait for a replica of {route.run_name}",
                "activation_queue_full",
            )
            return None
        self._waiting[key] = held + 1
        self.counters.waiting(route.run_id, 1)
        deadline = trio.current_time() + self.settings.activation_timeout_s
        try:
            while True:
                event = self._changed
                with trio.move_on_at(min(deadline, trio.current_time() + 0.5)):
                    await event.wait()
                now = self.routes.get(route.project, route.run_name)
                if now is None or now.run_id != route.run_id:
                    await problem(
                        scope, send, 404, "no such service", f"{route.run_name} is gone", "gone"
                    )
                    return None
                if not await self.check_gone(scope, send, now):
                    return None
                if now.replicas:
                    return now
                if trio.current_time() >= deadline:
                    await problem(
                        scope,
                        send,
                        504,
                        "no replica ready",
                        f"no replica of {route.run_name} became ready within "
                        f"{self.settings.activation_timeout_s:g} s",
                        "activation_timeout",
                    )
                    return None
        finally:
            left = self._waiting.get(key, 1) - 1
            if left > 0:
                self._waiting[key] = left
            else:
                self._waiting.pop(key, None)
            self.counters.waiting(route.run_id, -1)

    def _pick(self, replicas: tuple[Replica, ...], tried: set[tuple[str, int]]) -> Replica | None:
        """The replica with the fewest outstanding requests (ties taken in turn); one that
        refused a connection a moment ago only when nothing else is left."""
        pool, now = self.pool, time.monotonic()
        n = len(replicas)
        start = self._rr % n
        self._rr += 1
        best, best_load = None, 0
        for i in range(n):
            r = replicas[(start + i) % n]
            address = r.address
            if address in tried:
                continue
            load = pool.outstanding(address)
            if pool.failed(address, now):
                load += 1 << 30
            if best is None or load < best_load:
                best, best_load = r, load
        return best

    async def _connect(self, scope: Scope, send: Send, route: Route) -> tuple[Replica, Conn] | None:
        tried: set[tuple[str, int]] = set()
        errors = []
        while True:
            replica = self._pick(route.replicas, tried)
            if replica is None:
                await problem(
                    scope,
                    send,
                    502,
                    "no replica reachable",
                    "; ".join(errors) or f"{route.run_name} has no ready replica",
                    "bad_gateway",
                )
                return None
            tried.add(replica.address)
            try:
                return replica, await self.pool.connect(replica.address)
            except ConnectFailed as e:
                errors.append(str(e))
                log.info("ingress %s: %s (trying another replica)", route.run_name, e)

    # -- HTTP ----------------------------------------------------------------------------------
    async def proxy(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: Route,
        path: bytes,
        body: bytes | None = None,
    ) -> None:
        """Forward the request to a ready replica of ``route`` at ``path`` (raw); ``body``:
        already read (the model endpoint), else streamed from ``receive``."""
        t0 = time.perf_counter()
        limit = self.settings.body_limit
        headers, framing = request_headers(scope, body)
        if isinstance(framing, int) and framing > limit:
            await problem(
                scope, send, 413, "request too large", f"over the {limit} byte limit", "too_large"
            )
            self.metrics.observe(route.project, route.run_name, 413, 0.0)
            return
        ready = await self.ready_route(scope, send, route)
        if ready is None:
            return
        route = ready
        picked = await self._connect(scope, send, route)
        if picked is None:
            self.metrics.observe(route.project, route.run_name, 502, time.perf_counter() - t0)
            return
        replica, conn = picked
        address = replica.address
        query = scope.get("query_string")
        target = path + b"?" + query if query else path
        self.pool.begin(address)
        status = 502
        reusable = False
        try:
            status, reusable = await self._exchange(
                scope, receive, send, conn, target, headers, framing, body, limit
            )
        finally:
            self.pool.end(address)
            if reusable:
                self.pool.release(conn)
            else:
                conn.close_now()
            self.metrics.observe(route.project, route.run_name, status, time.perf_counter() - t0)
        self.counters.completed(route.run_id)

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        conn: Conn,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        framing: int | str | None,
        body: bytes | None,
        limit: int,
    ) -> tuple[int, bool]:
        """One request/response on ``conn``: (the status sent to the client, whether the
        connection may be reused)."""
        h, stream = conn.h11, conn.stream
        head = h.send(h11.Request(method=scope["method"], target=target, headers=headers))
        started = False
        try:
            try:
                if body is not None:
                    await stream.send_all(
                        head + h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage())
                    )
                elif framing is None:
                    await stream.send_all(head + h.send(h11.EndOfMessage()))
                else:
                    await self._send_body(receive, conn, head, limit)
            except _TooLarge:
                await problem(
                    scope,
                    send,
                    413,
                    "request too large",
                    f"the body is over the {limit} byte limit",
                    "too_large",
                )
                return 413, False
            except _ClientGone:
                return 499, False
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                # The replica closed while the body was sent: an answer may be waiting.
                pass
            timeout = self.settings.upstream_timeout_s
            event = await _next_event(conn, timeout)
            while isinstance(event, h11.InformationalResponse):
                event = await _next_event(conn, timeout)
            if not isinstance(event, h11.Response):
                raise _UpstreamError(f"unexpected {type(event).__name__}")
            status = event.status_code
            response_headers, streaming = response_headers_of(event.headers)
            await send(
                {"type": "http.response.start", "status": status, "headers": response_headers}
            )
            started = True
            if streaming:
                # Chunked or read-until-close (SSE token streams): a client that goes away
                # must not leave the replica's stream held open.
                broken: list[BaseException] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope)
                    try:
                        await _pump(conn, send, timeout)
                    except (
                        _UpstreamError,
                        h11.ProtocolError,
                        OSError,
                        trio.BrokenResourceError,
                    ) as e:
                        broken.append(e)
                    nursery.cancel_scope.cancel()
                if broken:
                    raise broken[0]
                done = h.their_state is h11.DONE
                return status, done and h.our_state is h11.DONE
            await _pump(conn, send, timeout)
            return status, True
        except (
            _UpstreamError,
            h11.ProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
        ) as e:
            if started:
                log.info("ingress: replica %s:%d broke off: %s", *conn.address, e)
                raise Aborted(f"the replica broke off the response: {e}") from None
            await problem(
                scope,
                send,
                502,
                "bad gateway",
                f"the replica did not answer properly: {e}",
                "bad_gateway",
            )
            return 502, False

    async def _send_body(self, receive: Receive, conn: Conn, head: bytes, limit: int) -> None:
        h, stream = conn.h11, conn.stream
        received = 0
        pending = head
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            data = message.get("body", b"")
            more = message.get("more_body", False)
            if data:
                received += len(data)
                if received > limit:
                    raise _TooLarge
                pending += h.send(h11.Data(data=data))
            if not more:
                await stream.send_all(pending + h.send(h11.EndOfMessage()))
                return
            if pending:
                await stream.send_all(pending)
                pending = b""

    # -- WebSocket -----------------------------------------------------------------------------
    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, route: Route, path: bytes
    ) -> None:
        ready = await self.ready_route(scope, send, route)
        if ready is None:
            return
        picked = await self._connect(scope, send, ready)
        if picked is None:
            return
        replica, conn = picked
        stream = conn.stream
        query = scope.get("query_string")
        target = (path + b"?" + query if query else path).decode("latin-1")
        host = next((v for k, v in scope["headers"] if k == b"host"), b"")
        extra, _ = request_headers(scope, None, skip=_WS_HEADERS)
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.pool.begin(replica.address)
        try:
            await stream.send_all(
                ws.send(
                    wse.Request(
                        host=host.decode("latin-1") or f"{replica.host}:{replica.port}",
                        target=target,
                        subprotocols=list(scope.get("subprotocols") or ()),
                        extra_headers=extra,
                    )
                )
            )
            answer = await _ws_handshake(ws, stream)
            first = await receive()
            if first["type"] != "websocket.connect":
                return
            if not isinstance(answer, wse.AcceptConnection):
                status = answer.status_code if isinstance(answer, wse.RejectConnection) else 502
                await _ws_refuse(scope, send, status)
                return
            await send({"type": "websocket.accept", "subprotocol": answer.subprotocol})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_ws_up, receive, ws, stream, nursery.cancel_scope)
                nursery.start_soon(_ws_down, send, ws, stream, nursery.cancel_scope)
            self.counters.completed(ready.run_id)
        except (
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            wsproto.utilities.LocalProtocolError,
            wsproto.utilities.RemoteProtocolError,
        ) as e:
            log.info("ingress: websocket to %s:%d ended: %s", *replica.address, e)
            with trio.CancelScope(shield=True):
                try:
                    await send({"type": "websocket.close", "code": 1011})
                except Exception:  # noqa: BLE001 - the client may be gone already
                    pass
        finally:
            self.pool.end(replica.address)
            conn.close_now()


# -- HTTP/1.1 toward the replica --------------------------------------------------------------
def request_headers(
    scope: Scope, body: bytes | None, skip: frozenset[bytes] = frozenset()
) -> tuple[list[tuple[bytes, bytes]], int | str | None]:
    """The headers to forward (hop-by-hop ones dropped, X-Forwarded-* added) and the body's
    framing: its length, "chunked", or None (no body)."""
    headers = scope["headers"]
    drop = HOP_BY_HOP
    for k, v in headers:
        if k == b"connection":
            extra = {t.strip().lower() for t in v.split(b",")}
            drop = drop | extra
    out = []
    framing: int | str | None = None
    forwarded_for = b""
    host = b""
    for k, v in headers:
        if k in drop or k in skip:
            if k == b"transfer-encoding":
                framing = "chunked"
            elif k == b"host":
                host = v
            continue
        if k == b"content-length":
            if body is not None:
                continue
            try:
                framing = int(v)
            except ValueError:
                raise BadRequest("malformed Content-Length") from None
        elif k == b"x-forwarded-for":
            forwarded_for = v
            continue
        elif k == b"host":
            host = v
        out.append((k, v))
    client = scope.get("client")
    ip = client[0].encode() if client else b""
    out.append((b"x-forwarded-for", forwarded_for + b", " + ip if forwarded_for else ip))
    scheme = scope.get("scheme", "http")
    out.append((b"x-forwarded-proto", b"https" if scheme in ("https", "wss") else b"http"))
    if host:
        out.append((b"x-forwarded-host", host))
    if body is not None:
        out.append((b"content-length", b"%d" % len(body)))
        framing = len(body)
    elif framing == "chunked":
        out.append((b"transfer-encoding", b"chunked"))
    elif framing == 0:
        framing = None
    if not host and b"host" not in skip:
        out.append((b"host", b"replica"))
    return out, framing


def response_headers_of(
    headers: list[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The replica's headers less hop-by-hop ones; whether the body streams (no length)."""
    drop = HOP_BY_HOP
    for k, v in headers:
        if k == b"connection":
            drop = drop | {t.strip().lower() for t in v.split(b",")}
    out = []
    streaming = True
    for k, v in headers:
        if k in drop:
            continue
        if k == b"content-length":
            streaming = False
        out.append((k, v))
    return out, streaming


async def _next_event(conn: Conn, timeout: float) -> Any:
    h = conn.h11
    while True:
        event = h.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.move_on_after(timeout) as scope:
            data = await conn.stream.receive_some(READ_SIZE)
        if scope.cancelled_caught:
            raise _UpstreamError(f"no answer within {timeout:g} s")
        h.receive_data(data)


async def _pump(conn: Conn, send: Send, timeout: float) -> None:
    """The response body to the client as it arrives: what one read brought, at once."""
    h = conn.h11
    pending = b""
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            if pending:
                await send({"type": "http.response.body", "body": pending, "more_body": True})
                pending = b""
            with trio.move_on_after(timeout) as scope:
                data = await conn.stream.receive_some(READ_SIZE)
            if scope.cancelled_caught:
                raise _UpstreamError(f"no data within {timeout:g} s")
            h.receive_data(data)
        elif isinstance(event, h11.Data):
            pending = pending + event.data if pending else bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            await send({"type": "http.response.body", "body": pending, "more_body": False})
            return
        elif isinstance(event, h11.ConnectionClosed):
            raise _UpstreamError("the replica closed the connection")


async def _watch_disconnect(receive: Receive, cancel: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel.cancel()
            return


# -- WebSocket toward the replica -------------------------------------------------------------
async def _ws_handshake(ws: wsproto.WSConnection, stream: trio.SocketStream) -> Any:
    with trio.fail_after(UPSTREAM_TIMEOUT_S):
        while True:
            data = await stream.receive_some(READ_SIZE)
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, wse.AcceptConnection | wse.RejectConnection):
                    return event
            if not data:
                return None


async def _ws_refuse(scope: Scope, send: Send, status: int) -> None:
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = json.dumps({"title": "websocket refused by the replica", "status": status}).encode()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status if 400 <= status < 600 else 502,
                "headers": [(b"content-type", PROBLEM)],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1011})


async def _ws_up(
    receive: Receive, ws: wsproto.WSConnection, stream: trio.SocketStream, done: trio.CancelScope
) -> None:
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            data = text if text is not None else message.get("bytes") or b""
            await stream.send_all(ws.send(wse.Message(data=data)))
        elif kind == "websocket.disconnect":
            try:
                await stream.send_all(ws.send(wse.CloseConnection(code=message.get("code", 1000))))
            except Exception:  # noqa: BLE001 - the replica may be gone already
                pass
            done.cancel()
            return


async def _ws_down(
    send: Send, ws: wsproto.WSConnection, stream: trio.SocketStream, done: trio.CancelScope
) -> None:
    parts: list[Any] = []
    size = 0
    while True:
        data = await stream.receive_some(READ_SIZE)
        ws.receive_data(data or None)
        for event in ws.events():
            if isinstance(event, wse.Message):
                parts.append(event.data)
                size += len(event.data)
                if size > MAX_WS_MESSAGE:
                    await send({"type": "websocket.close", "code": 1009})
                    done.cancel()
                    return
                if event.message_finished:
                    whole = parts[0] if len(parts) == 1 else type(parts[0])().join(parts)
                    parts, size = [], 0
                    key = "text" if isinstance(event, wse.TextMessage) else "bytes"
                    await send({"type": "websocket.send", key: whole})
            elif isinstance(event, wse.Ping):
                await stream.send_all(ws.send(event.response()))
            elif isinstance(event, wse.CloseConnection):
                try:
                    await stream.send_all(ws.send(event.response()))
                except Exception:  # noqa: BLE001
                    pass
                await send({"type": "websocket.close", "code": event.code})
                done.cancel()
                return
        if not data:
            await send({"type": "websocket.close", "code": 1011})
            done.cancel()
            return


__all__ = ["Aborted", "Ingress", "IngressSettings"]
