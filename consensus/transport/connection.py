"""One connection between two nodes: framing over a trio stream, and the opening handshake.

Opening a connection (both directions use the same steps)::

    dialer                                   acceptor
    TCP connect  ─────────────────────────►  accept
    TLS handshake (server_hostname=node-P)   TLS handshake, client cert required
      check the cert names node P              take the peer id from the cert CN
    HELLO [my_id, kind]  ─────────────────►  HELLO id must equal the cert's id
                         ◄─────────────────  HELLO [P, kind]
    HELLO id must be P; the stream is up

The acceptor's HELLO is an explicit "you are accepted": with TLS 1.3 a server rejects a client
certificate only *after* the client's handshake has completed, so without it a dialer with a bad
certificate would believe it was connected, mark the peer up and reset its backoff. In plaintext
mode (simulation, benchmarks) HELLO is the only identity there is.
"""

from __future__ import annotations

import collections
import math
import ssl

import trio

from . import codec
from .codec import FrameType, StreamKind
from .errors import FrameError, PeerIdentityError
from .tls import node_name, peer_node_id

WRITE_PIECE = 256 * 1024
"""Largest single ``send_all`` on the underlying stream."""

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    OSError,
    FrameError,
    PeerIdentityError,
)
"""Everything that ends one connection and nothing more: the peer went away, stalled, spoke
garbage, or is not who it should be."""


class FramedStream:
    """A trio stream that sends byte strings and receives whole frames."""

    __slots__ = ("_pending", "_reader", "_receive_size", "peer_id", "stream")

    def __init__(self, stream: trio.abc.Stream, max_frame_size: int, receive_size: int) -> None:
        self.stream = stream
        self.peer_id = 0
        self._reader = codec.FrameReader(max_frame_size)
        self._receive_size = receive_size
        self._pending: collections.deque[tuple[FrameType, bytes]] = collections.deque()

    async def send_all(self, data: bytes, timeout: float = math.inf) -> None:
        """Write ``data``, failing with ``trio.TooSlowError`` when no ``WRITE_PIECE`` of it
        gets through within ``timeout`` (the peer stopped reading), however long the whole
        takes. Pieces also bound how much TLS encrypts in one go without yielding."""
        if len(data) <= WRITE_PIECE:
            with trio.fail_after(timeout):
                await self.stream.send_all(data)
            return
        with memoryview(data) as view:
            for offset in range(0, len(view), WRITE_PIECE):
                with trio.fail_after(timeout):
                    await self.stream.send_all(view[offset : offset + WRITE_PIECE])

    async def receive_frame(self) -> tuple[FrameType, bytes] | None:
        """The next frame, or None at a clean end of stream (EOF between frames)."""
        while not self._pending:
            data = await self.stream.receive_some(self._receive_size)
            if not data:
                if self._reader.buffered:
                    raise FrameError(
                        f"connection closed inside a frame ({self._reader.buffered} bytes)"
                    )
                return None
            self._pending.extend(self._reader.feed(data))
        return self._pending.popleft()

    async def aclose(self) -> None:
        """Close without a TLS close_notify exchange: a peer that stopped reading must not be
        able to hold our shutdown hostage."""
        await trio.aclose_forcefully(self.stream)


async def _expect_hello(conn: FramedStream) -> tuple[int, StreamKind]:
    frame = await conn.receive_frame()
    if frame is None:
        raise trio.BrokenResourceError("peer closed the connection before HELLO")
    frame_type, body = frame
    if frame_type is not FrameType.HELLO:
        raise FrameError(f"expected HELLO, got {frame_type.name}")
    return codec.decode_hello(body)


async def dial(
    node_id: int,
    peer_id: int,
    address: tuple[str, int],
    kind: StreamKind,
    *,
    client_context: ssl.SSLContext | None,
    max_frame_size: int,
    receive_size: int,
) -> FramedStream:
    """Connect to ``peer_id`` at ``address`` and complete the HELLO exchange.

    Raises one of ``CONNECTION_ERRORS``; the caller bounds it with a timeout."""
    host, port = address
    tcp = await trio.open_tcp_stream(host, port)
    stream: trio.abc.Stream = tcp
    try:
        if client_context is not None:
            ssl_stream = trio.SSLStream(tcp, client_context, server_hostname=node_name(peer_id))
            stream = ssl_stream
            await ssl_stream.do_handshake()
            # The hostname check already proved this; keep it explicit against a context
            # that was built with check_hostname off.
            if peer_node_id(ssl_stream) != peer_id:
                raise PeerIdentityError(f"dialed node {peer_id} but reached another node")
        conn = FramedStream(stream, max_frame_size, receive_size)
        await conn.send_all(codec.encode_hello(node_id, kind))
        their_id, their_kind = await _expect_hello(conn)
        if their_id != peer_id or their_kind is not kind:
            raise PeerIdentityError(
                f"dialed node {peer_id} ({kind.name}), answered by {their_id} ({their_kind.name})"
            )
        conn.peer_id = peer_id
        return conn
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def accept(
    node_id: int,
    tcp: trio.abc.Stream,
    *,
    server_context: ssl.SSLContext | None,
    max_frame_size: int,
    receive_size: int,
) -> tuple[FramedStream, StreamKind]:
    """Authenticate an accepted connection and answer its HELLO.

    Returns the framed stream (with ``peer_id`` set) and what it carries. Raises one of
    ``CONNECTION_ERRORS`` after closing the stream; the caller bounds this with a timeout."""
    stream: trio.abc.Stream = tcp
    try:
        cert_id = None
        if server_context is not None:
            ssl_stream = trio.SSLStream(tcp, server_context, server_side=True)
            stream = ssl_stream
            await ssl_stream.do_handshake()
            cert_id = peer_node_id(ssl_stream)
        conn = FramedStream(stream, max_frame_size, receive_size)
        their_id, kind = await _expect_hello(conn)
        if cert_id is not None and their_id != cert_id:
            raise PeerIdentityError(f"certificate of node {cert_id} says HELLO as node {their_id}")
        await conn.send_all(codec.encode_hello(node_id, kind))
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    conn.peer_id = their_id
    return conn, kind
