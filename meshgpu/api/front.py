"""The API port's front door: every connection is accepted (and its TLS handshake made) here;
one kind of request is answered here and every other connection goes to hypercorn unchanged.

The one kind is the SSH tunnel's plain byte stream (``meshgpu ssh-proxy``; see
``meshgpu/api/tunnel.py`` ``RawTunnel``): an HTTP/1.1 ``GET /api/v1/runs/{name}/ssh`` with
``Upgrade: meshgpu-ssh/1``. After the upgrade the tunnel carries bytes, not WebSocket messages,
so a relaying node moves them with large reads and no per-message parsing or ASGI work (through
hypercorn every ≤16 KiB TLS record of an upload was one wsproto event and one ASGI message).

Deciding costs nothing for other requests: the first bytes a client sends are read, and unless
they are the start of ``GET /api/v1/runs/`` the connection is handed to hypercorn at once with
those bytes put back in front of the stream (HTTP/2's preface, every other method and path);
only a ``GET /api/v1/runs/...`` waits for its head (it comes in one piece from any client) to
look for the upgrade. A connection hypercorn gets is served exactly as ``hypercorn.trio.serve``
serves one (its ``TCPServer``, worker context and lifespan; the same ``Config``)."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from math import inf
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

log = logging.getLogger(__name__)

MAX_HEAD = 16 << 10  # a tunnel request's head: well under this (a token and a few headers)
_PREFIX = b"GET /api/v1/runs/"
_TARGET = re.compile(rb"^/api/v1/runs/([^/?#]+)/ssh(?:\?([^#]*))?$")

# A request this front answers itself, else None (the connection goes to hypercorn).
Handler = Callable[["Head", trio.abc.Stream], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Head:
    """A tunnel request's head: the run selector (percent-decoded), its query string, its
    headers (names lower-case, as ASGI has them) and whatever came after the head."""

    name: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    rest: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


def classify(buf: bytes, upgrade: bytes) -> Head | bool | None:
    """What the first bytes of a connection are: a ``Head`` (a tunnel request asking for
    ``upgrade``), False (anything else: hypercorn's), None (cannot tell yet: read more)."""
    n = len(_PREFIX)
    if len(buf) < n:
        return None if _PREFIX.startswith(buf) else False
    if not buf.startswith(_PREFIX):
        return False
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None if len(buf) < MAX_HEAD else False
    lines = buf[:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        return False
    m = _TARGET.match(parts[1])
    if m is None:
        return False
    headers = []
    for line in lines[1:]:
        k, sep, v = line.partition(b":")
        if not sep or not k or k != k.strip():
            return False  # malformed: hypercorn answers it
        headers.append((k.lower(), v.strip()))
    wanted = next((v for k, v in headers if k == b"upgrade"), b"")
    connection = next((v for k, v in headers if k == b"connection"), b"")
    if wanted.lower() != upgrade or b"upgrade" not in connection.lower():
        return False
    from urllib.parse import unquote_to_bytes

    try:
        name = unquote_to_bytes(m[1]).decode()
    except UnicodeDecodeError:
        return False
    return Head(name, m[2] or b"", headers, buf[end + 4 :])


class Replayed(trio.abc.Stream):
    """A stream with bytes already read put back in front; everything else is the inner
    stream's (hypercorn asks it for its TLS details and its socket)."""

    def __init__(self, inner: trio.abc.Stream, head: bytes) -> None:
        self._inner, self._head = inner, head

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._head:
            await trio.lowlevel.checkpoint()
            n = len(self._head) if max_bytes is None else max_bytes
            data, self._head = self._head[:n], self._head[n:]
            return data
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        # As hypercorn's own (``https_compatible``) TLS streams close: at once, never waiting
        # to hand a close_notify to a client that does not read.
        await trio.aclose_forcefully(self._inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Front:
    """Serve ``app`` on a listening socket as hypercorn would with ``config``, but answer the
    requests ``claim`` returns a handler for here."""

    def __init__(
        self,
        app: Any,
        config: Config,
        upgrade: bytes,
        claim: Callable[[Head], Handler | None],
    ) -> None:
        self.app = wrap_app(app, config.wsgi_max_body_size, "asgi")
        self.config = config
        self.upgrade = upgrade.lower()
        self.claim = claim
        self.ssl_context = config.create_ssl_context() if config.ssl_enabled else None

    async def serve(
        self, sock: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Until cancelled (then as hypercorn: in-flight connections get ``graceful_timeout``,
        and the app its lifespan shutdown)."""
        config = self.config
        state: dict[str, Any] = {}
        lifespan = Lifespan(self.app, config, state)
        context = WorkerContext(None)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            async with trio.open_nursery() as handlers:
                try:
                    task_status.started()
                    await trio.serve_listeners(
                        lambda stream: self._connection(stream, context, state),
                        [listener],
                        handler_nursery=handlers,
                    )
                finally:
                    await context.terminated.set()
                    handlers.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()

    async def _connection(
        self, tcp: trio.SocketStream, context: WorkerContext, state: dict[str, Any]
    ) -> None:
        stream: trio.abc.Stream = tcp
        if self.ssl_context is not None:
            # Not ``https_compatible``: a tunnel's normal end is our close_notify (``aclose``),
            # which the client tells from a broken connection. (What hypercorn gets closes as
            # its own streams do: ``Replayed.aclose``; a client's EOF without close_notify
            # reaches it as a broken stream, which it treats as the EOF it is.)
            stream = trio.SSLStream(tcp, self.ssl_context, server_side=True)
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                await trio.aclose_forcefully(stream)
                return
        buf = b""
        found: Head | bool | None = None
        try:
            with trio.fail_after(self.config.keep_alive_timeout or inf):
                while found is None:
                    data = await stream.receive_some(1 << 16)
                    if not data:
                        found = False
                        break
                    buf += data
                    found = classify(buf, self.upgrade)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            await trio.aclose_forcefully(stream)
            return
        handler = self.claim(found) if isinstance(found, Head) else None
        if handler is not None and isinstance(found, Head):
            try:
                await handler(found, stream)
            except Exception:  # one connection's trouble never takes the API port down
                log.exception("the connection's handler failed")
            finally:
                await trio.aclose_forcefully(stream)
            return
        await TCPServer(
            self.app, self.config, context, ConnectionState(state.copy()), Replayed(stream, buf)
        )


__all__ = ["Front", "Head", "Replayed", "classify"]
