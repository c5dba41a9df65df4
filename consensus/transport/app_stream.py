"""``AppStream``: the embedding application's side of one ``APP`` connection.

An ``APP`` connection carries opaque byte strings, one per ``APP`` frame, in both directions,
for as long as the two sides keep it open: a single request and its reply (``Transport.request``,
what a gossip push/pull uses) is the simplest case; an application that streams (a file in
chunks, a log while it grows) sends and receives as many frames as it needs. What the bodies mean
-- which one is a request, where a stream ends -- is the application's business: the transport
only frames, bounds (``max_body``, the frame limit), authenticates (``peer_id`` comes from the
peer's certificate) and applies backpressure (``send`` waits while the peer does not read; it
fails once no byte got through for ``timeout`` seconds).
"""

from __future__ import annotations

import math

import trio

from . import codec
from .codec import FrameType
from .connection import CONNECTION_ERRORS, FramedStream
from .errors import FrameError, TransportError


class AppStream:
    """One ``APP`` connection, seen from either end. Every failure of the connection (the peer
    went away, stalled, sent garbage, or a timeout passed) is raised as ``TransportError``."""

    __slots__ = ("_conn", "_write_timeout", "max_body")

    def __init__(self, conn: FramedStream, *, max_body: int, write_timeout: float) -> None:
        self._conn = conn
        self._write_timeout = write_timeout
        self.max_body = max_body
        """Largest body ``send`` takes and ``receive`` accepts (the transport's frame limit)."""

    @property
    def peer_id(self) -> int:
        """The node at the other end, as its certificate names it."""
        return self._conn.peer_id

    async def send(self, body: bytes, *, timeout: float | None = None) -> None:
        """Write one body; waits while the peer is not reading (TCP's flow control), and fails
        when no part of it gets through for ``timeout`` seconds (default: the transport's
        ``write_timeout``)."""
        if len(body) > self.max_body:
            raise ValueError(f"a body of {len(body)} bytes is over the {self.max_body} limit")
        try:
            await self._conn.send_all(
                codec.encode_frame(FrameType.APP, body),
                self._write_timeout if timeout is None else timeout,
            )
        except CONNECTION_ERRORS as exc:
            raise TransportError(f"send to node {self.peer_id} failed: {exc!r}") from exc

    async def receive(self, *, timeout: float = math.inf) -> bytes | None:
        """The next body, or ``None`` when the peer closed the connection cleanly. Fails after
        ``timeout`` seconds without a whole frame."""
        try:
            with trio.fail_after(timeout):
                frame = await self._conn.receive_frame()
        except CONNECTION_ERRORS as exc:
            raise TransportError(f"receive from node {self.peer_id} failed: {exc!r}") from exc
        if frame is None:
            return None
        if frame[0] is not FrameType.APP:
            raise FrameError(f"{frame[0].name} frame on an APP stream")
        return frame[1]

    async def aclose(self) -> None:
        await self._conn.aclose()
