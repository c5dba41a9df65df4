"""The peer protocol's frames: what one member says to another on an ``APP`` stream of the
mutual-TLS transport (``consensus.transport.AppStream``).

The transport carries opaque bodies, one per frame, each at most its frame limit. Here every
body of the peer protocol is::

    MAGIC     1 byte   0xA7: a peer-protocol body. Gossip's stream packets begin with their
                       version byte (1), so one ``on_stream`` tells the two apart by this byte.
    kind      1 byte   CALL, DATA, END or ERROR
    payload   the rest (msgpack for CALL, END and ERROR; raw bytes for DATA)

One exchange is one connection (no queueing behind another call, no head-of-line blocking)::

    caller                                      callee
    CALL [op, args]      ─────────────────────►
    DATA ... (a request body, in chunks)  ────►  (only for ops that take one: code pushes)
    END  null            ─────────────────────►
                         ◄─────────────────────  DATA ... (a reply body: archive, log bytes)
                         ◄─────────────────────  END result    or    ERROR {kind,title,...}

Limits: a DATA frame holds at most ``CHUNK`` bytes; a reader gives the most it will take of a
whole body (``cap``) and how long it waits for the next frame (``idle``) and refuses the stream
the moment either is passed.

A refusal is an error of ``meshgpu.errors`` on both ends: the callee's handler raises one (a
use case's ``NotFound``, ``Denied``, ...), the ERROR frame names its kind, and the caller raises
the same kind; a call that cannot complete is ``Unavailable``. Backpressure is TCP's: a writer's ``send`` waits while the reader
does not read, so neither side ever holds more than a frame or two beyond what it asked for.
"""

from __future__ import annotations

import enum
import math
from collections.abc import AsyncIterator
from typing import Any, Protocol

import msgpack
import trio

from meshgpu.errors import (
    Conflict,
    Denied,
    Invalid,
    MeshError,
    NotFound,
    Remote,
    TooLarge,
    Unavailable,
)

MAGIC = 0xA7
CHUNK = 256 * 1024
"""Bytes per DATA frame: well under the transport's frame limit, large enough that the
per-frame cost (a header, one TLS record batch) is noise."""


class Kind(enum.IntEnum):
    CALL = 1
    DATA = 2
    END = 3
    ERROR = 4


def unreachable(detail: str) -> Unavailable:
    """A call that did not complete: the member could not be reached, went away or answered
    too late."""
    return Unavailable("peer unavailable", detail, "unavailable")


class ProtocolError(Invalid):
    """Bytes that are not the peer protocol."""

    def __init__(self, detail: str, code: str = "bad_peer_frame") -> None:
        super().__init__("peer protocol error", detail, code)


def too_large(detail: str) -> TooLarge:
    """A body past the reader's cap."""
    return TooLarge("peer protocol error", detail, "too_large")


_KINDS: dict[str, type[MeshError]] = {
    "invalid": Invalid,
    "denied": Denied,
    "not_found": NotFound,
    "conflict": Conflict,
    "too_large": TooLarge,
    "unavailable": Unavailable,
}
"""The kinds of ``meshgpu.errors`` an ERROR frame names; any other refusal travels as
``remote`` with its status (``Remote``: what a member forwarded to answered; 500 otherwise)."""


class Channel(Protocol):
    """One end of a stream of bodies: ``consensus.transport.AppStream``, or an in-memory pair
    in tests (``memory_pair``)."""

    @property
    def peer_id(self) -> int: ...

    async def send(self, body: bytes, *, timeout: float | None = None) -> None: ...

    async def receive(self, *, timeout: float = math.inf) -> bytes | None: ...


# -- encoding -----------------------------------------------------------------------------------

_packb = msgpack.Packer(use_bin_type=True).pack


def frame(kind: Kind, payload: bytes = b"") -> bytes:
    return bytes((MAGIC, kind)) + payload


def is_peer_body(body: bytes) -> bool:
    return body[:1] == bytes((MAGIC,))


def parse(body: bytes) -> tuple[Kind, bytes]:
    if len(body) < 2 or body[0] != MAGIC:
        raise ProtocolError("not a peer-protocol frame")
    try:
        kind = Kind(body[1])
    except ValueError:
        raise ProtocolError(f"unknown frame kind {body[1]}") from None
    return kind, body[2:]


def _unpack(payload: bytes) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for bad bytes
        raise ProtocolError(f"undecodable payload: {exc}") from None


def encode_call(op: str, args: dict[str, Any]) -> bytes:
    return frame(Kind.CALL, _packb([op, args]))


def decode_call(payload: bytes) -> tuple[str, dict[str, Any]]:
    value = _unpack(payload)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], dict)
    ):
        raise ProtocolError("a CALL is [op, {args}]")
    return value[0], value[1]


def encode_error(err: MeshError) -> bytes:
    """A refusal as its kind in ``meshgpu.errors`` (``Remote``, or an error of no known kind:
    ``remote`` with a status) and its title, detail and code."""
    kind = next((name for name, cls in _KINDS.items() if isinstance(err, cls)), "remote")
    doc: dict[str, Any] = {"kind": kind, "title": err.title, "detail": err.detail, "code": err.code}
    if kind == "remote":
        doc["status"] = err.status if isinstance(err, Remote) else 500
    return frame(Kind.ERROR, _packb(doc))


def decode_error(payload: bytes) -> MeshError:
    """The ``meshgpu.errors`` kind the callee refused with (``Remote`` for any other)."""
    doc = _unpack(payload)
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
        raise ProtocolError("an ERROR is {kind, title, detail, code}")
    title, detail, code = (str(doc.get(k, "")) for k in ("title", "detail", "code"))
    cls = _KINDS.get(doc["kind"])
    if cls is not None:
        return cls(title, detail, code)
    status = doc.get("status")
    return Remote(
        status if type(status) is int and 400 <= status < 600 else 502, title, detail, code
    )


# -- sending ------------------------------------------------------------------------------------


async def send_data(ch: Channel, data: bytes, *, timeout: float | None = None) -> None:
    """``data`` as DATA frames of at most ``CHUNK`` bytes (nothing for empty data)."""
    with memoryview(data) as view:
        for offset in range(0, len(view), CHUNK):
            await ch.send(frame(Kind.DATA, bytes(view[offset : offset + CHUNK])), timeout=timeout)


async def send_end(ch: Channel, value: Any = None) -> None:
    await ch.send(frame(Kind.END, _packb(value)))


async def send_error(ch: Channel, err: MeshError) -> None:
    await ch.send(encode_error(err))


# -- receiving ----------------------------------------------------------------------------------


async def next_frame(ch: Channel, idle: float) -> tuple[Kind, bytes]:
    """The next frame within ``idle`` seconds; an ERROR frame is raised as its ``MeshError``,
    a closed stream or a timeout as ``Unavailable`` (``unreachable``)."""
    try:
        body = await ch.receive(timeout=idle)
    except trio.TooSlowError:
        raise unreachable(f"nothing from node {ch.peer_id} for {idle:g}s") from None
    if body is None:
        raise unreachable(f"node {ch.peer_id} closed the stream")
    kind, payload = parse(body)
    if kind is Kind.ERROR:
        raise decode_error(payload)
    return kind, payload


async def iter_data(ch: Channel, *, idle: float, cap: float = math.inf) -> AsyncIterator[bytes]:
    """Yield a body's DATA chunks until its END (whose value is dropped). More than ``cap``
    bytes in all is ``TooLarge`` (``too_large``), raised before the chunk that passes it is
    yielded. Empty chunks (keepalives of a quiet followed stream) are skipped."""
    total = 0
    while True:
        kind, payload = await next_frame(ch, idle)
        if kind is Kind.END:
            return
        if kind is not Kind.DATA:
            raise ProtocolError(f"{kind.name} inside a body")
        total += len(payload)
        if total > cap:
            raise too_large(f"a body over {cap:g} bytes")
        if payload:
            yield payload


async def read_body(ch: Channel, *, idle: float, cap: float) -> bytes:
    """A whole body (DATA frames up to END), at most ``cap`` bytes."""
    data = bytearray()
    async for chunk in iter_data(ch, idle=idle, cap=cap):
        data += chunk
    return bytes(data)


async def read_result(ch: Channel, *, idle: float) -> Any:
    """The END value of a reply that has no body."""
    kind, payload = await next_frame(ch, idle)
    if kind is not Kind.END:
        raise ProtocolError(f"expected END, got {kind.name}")
    return _unpack(payload)


# -- in memory, for tests -------------------------------------------------------------------------


class MemoryChannel:
    """One end of an in-memory stream: a bounded queue each way, so backpressure holds."""

    def __init__(
        self,
        peer_id: int,
        send: trio.MemorySendChannel[bytes | None],
        receive: trio.MemoryReceiveChannel[bytes | None],
        max_body: int,
    ) -> None:
        self.peer_id = peer_id
        self.max_body = max_body
        self._send, self._receive = send, receive
        self.sent = 0

    async def send(self, body: bytes, *, timeout: float | None = None) -> None:
        if len(body) > self.max_body:
            raise ValueError(f"a body of {len(body)} bytes is over the {self.max_body} limit")
        with trio.fail_after(math.inf if timeout is None else timeout):
            await self._send.send(body)
        self.sent += 1

    async def receive(self, *, timeout: float = math.inf) -> bytes | None:
        with trio.fail_after(timeout):
            try:
                return await self._receive.receive()
            except (trio.EndOfChannel, trio.BrokenResourceError):
                return None

    async def aclose(self) -> None:
        await self._send.aclose()


def memory_pair(
    caller_id: int = 1, callee_id: int = 2, *, buffer: int = 1, max_body: int = 8 << 20
) -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected ends: ``a`` (its ``peer_id`` is the callee) and ``b`` (the caller's id)."""
    ab_send, ab_recv = trio.open_memory_channel[bytes | None](buffer)
    ba_send, ba_recv = trio.open_memory_channel[bytes | None](buffer)
    return (
        MemoryChannel(callee_id, ab_send, ba_recv, max_body),
        MemoryChannel(caller_id, ba_send, ab_recv, max_body),
    )
