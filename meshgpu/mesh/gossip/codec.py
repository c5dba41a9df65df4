"""Wire format of gossip packets: one version byte, then a msgpack array of messages.

A datagram (UDP) and a stream packet (the shell frames it on TCP) have the same shape::

    version   1 byte    ``VERSION``; a packet of any other version is refused
    body      msgpack   array of messages, each ``[type, field, ...]`` (positional: compact)

Messages are encoded one by one so that queued broadcasts are encoded once and then spliced into
any number of datagrams (:func:`pack`), and so that the core knows exact sizes when it fills a
datagram up to ``udp_buffer_size`` (memberlist's compound messages, without per-message length
prefixes: msgpack values delimit themselves).

Decoding is strict because the bytes come from the network: every field is type-checked
(``type(x) is int``, so that a msgpack ``true`` is not a 1), integers are non-negative and
bounded, enums must be known values, metadata holds only plain msgpack types. Any failure,
including one inside msgpack, surfaces as :class:`DecodeError` and nothing else.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack

from .errors import DecodeError
from .messages import (
    Ack,
    Addr,
    Alive,
    Dead,
    IndirectPing,
    MemberRecord,
    MemberState,
    Message,
    Meta,
    Nack,
    Ping,
    PushPull,
    Suspect,
)

VERSION = 1
_VERSION_BYTE = bytes([VERSION])
MAX_ARRAY_HEADER = 5
"""Bytes of the largest msgpack array header: reserve them when filling a datagram."""
PACKET_OVERHEAD = 1 + MAX_ARRAY_HEADER
"""Bytes a packet adds around its encoded messages (version byte + array header), at most."""

_MAX_INT = (1 << 64) - 1
MAX_ID_LEN = 256
"""Longest member id a packet may carry."""
_MAX_HOST_LEN = 255


class MessageType(enum.IntEnum):
    """The first element of every encoded message."""

    PING = 1
    INDIRECT_PING = 2
    ACK = 3
    NACK = 4
    ALIVE = 5
    SUSPECT = 6
    DEAD = 7
    PUSH_PULL = 8


_packb = msgpack.Packer(use_bin_type=True).pack


def encode_meta(meta: Meta) -> bytes:
    """The msgpack encoding of a metadata map (its size is what ``meta_max_size`` limits)."""
    return _packb(dict(meta))


def encode_message(msg: Message) -> bytes:
    """One message as a msgpack array (no version byte): what :func:`pack` splices."""
    match msg:
        case Ping(seq, target):
            body: list[Any] = [MessageType.PING, seq, target]
        case IndirectPing(seq, target, addr, nack):
            body = [MessageType.INDIRECT_PING, seq, target, list(addr), nack]
        case Ack(seq):
            body = [MessageType.ACK, seq]
        case Nack(seq):
            body = [MessageType.NACK, seq]
        case Alive(member, incarnation, addr, meta):
            body = [MessageType.ALIVE, member, incarnation, list(addr), dict(meta)]
        case Suspect(member, incarnation, sender):
            body = [MessageType.SUSPECT, member, incarnation, sender]
        case Dead(member, incarnation, sender):
            body = [MessageType.DEAD, member, incarnation, sender]
        case PushPull(members, join, reply):
            records = [
                [r.member, list(r.addr), r.incarnation, int(r.state), dict(r.meta)] for r in members
            ]
            body = [MessageType.PUSH_PULL, join, reply, records]
        case _:
            raise TypeError(f"not a gossip message: {msg!r}")
    try:
        return _packb(body)
    except (TypeError, ValueError, OverflowError) as exc:
        # A programming error (an un-encodable metadata value, a negative number): crash loudly
        # at the sender rather than emitting a packet every receiver will refuse.
        raise TypeError(f"cannot encode {type(msg).__name__}: {exc}") from exc


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def pack(encoded: Sequence[bytes]) -> bytes:
    """A packet from messages already encoded with :func:`encode_message`."""
    return b"".join((_VERSION_BYTE, _array_header(len(encoded)), *encoded))


def encode(messages: Iterable[Message]) -> bytes:
    """A packet carrying ``messages``."""
    return pack([encode_message(m) for m in messages])


def decode(data: bytes) -> tuple[Message, ...]:
    """The messages in a packet; :class:`DecodeError` for anything that is not a valid one."""
    if len(data) < 2:
        raise DecodeError("packet too short")
    if data[0] != VERSION:
        raise DecodeError(f"unsupported gossip version {data[0]} (this member speaks {VERSION})")
    try:
        body = msgpack.unpackb(
            memoryview(data)[1:], raw=False, use_list=True, strict_map_key=True, timestamp=0
        )
    except Exception as exc:  # msgpack raises a zoo of types (ValueError, StackError, ...)
        raise DecodeError(f"undecodable msgpack: {exc}") from None
    if type(body) is not list or not body:
        raise DecodeError("packet body is not a non-empty array of messages")
    return tuple(_decode_message(m) for m in body)


# ---------------------------------------------------------------------- decoding helpers


def _decode_message(raw: Any) -> Message:
    if type(raw) is not list or not raw:
        raise DecodeError("message is not a non-empty array")
    kind = raw[0]
    if type(kind) is not int:
        raise DecodeError("message type is not an integer")
    fields = raw[1:]
    try:
        decoder = _DECODERS[kind]
    except KeyError:
        raise DecodeError(f"unknown message type {kind}") from None
    return decoder(fields)


def _arity(fields: list[Any], n: int, what: str) -> None:
    if len(fields) != n:
        raise DecodeError(f"{what} has {len(fields)} fields, expected {n}")


def _uint(x: Any, what: str) -> int:
    if type(x) is not int or x < 0 or x > _MAX_INT:
        raise DecodeError(f"{what} is not an unsigned 64-bit integer")
    return x


def _id(x: Any, what: str) -> str:
    if type(x) is not str or not x or len(x) > MAX_ID_LEN:
        raise DecodeError(f"{what} is not a member id (1-{MAX_ID_LEN} characters)")
    return x


def _bool(x: Any, what: str) -> bool:
    if type(x) is not bool:
        raise DecodeError(f"{what} is not a boolean")
    return x


def _addr(x: Any) -> Addr:
    if (
        type(x) is not list
        or len(x) != 2
        or type(x[0]) is not str
        or not x[0]
        or len(x[0]) > _MAX_HOST_LEN
        or type(x[1]) is not int
        or not 0 <= x[1] <= 65535
    ):
        raise DecodeError("address is not [host, port]")
    return (x[0], x[1])


_PLAIN = (type(None), bool, int, float, str, bytes)


def _plain(x: Any, depth: int) -> None:
    # Metadata ends up in API responses and Raft commands: allow only plain values, so that an
    # extension type or a timestamp object cannot sneak through a peer's packet. Scalars are
    # checked inline (push/pull records make this a hot loop); only containers recurse.
    if depth > 8:
        raise DecodeError("metadata nested too deeply")
    if type(x) is dict:
        for k, v in x.items():
            if type(k) is not str:
                raise DecodeError("metadata map keys must be strings")
            if type(v) not in _PLAIN:
                _container(v, depth)
    else:
        for v in x:
            if type(v) not in _PLAIN:
                _container(v, depth)


def _container(v: Any, depth: int) -> None:
    if type(v) is dict or type(v) is list:
        _plain(v, depth + 1)
    else:
        raise DecodeError(f"metadata holds a {type(v).__name__}")


def _meta(x: Any) -> Meta:
    if type(x) is not dict:
        raise DecodeError("metadata is not a map")
    _plain(x, 0)
    return x


def _ping(f: list[Any]) -> Ping:
    _arity(f, 2, "ping")
    return Ping(_uint(f[0], "seq"), _id(f[1], "target"))


def _indirect_ping(f: list[Any]) -> IndirectPing:
    _arity(f, 4, "indirect ping")
    return IndirectPing(_uint(f[0], "seq"), _id(f[1], "target"), _addr(f[2]), _bool(f[3], "nack"))


def _ack(f: list[Any]) -> Ack:
    _arity(f, 1, "ack")
    return Ack(_uint(f[0], "seq"))


def _nack(f: list[Any]) -> Nack:
    _arity(f, 1, "nack")
    return Nack(_uint(f[0], "seq"))


def _alive(f: list[Any]) -> Alive:
    _arity(f, 4, "alive")
    return Alive(_id(f[0], "member"), _uint(f[1], "incarnation"), _addr(f[2]), _meta(f[3]))


def _suspect(f: list[Any]) -> Suspect:
    _arity(f, 3, "suspect")
    return Suspect(_id(f[0], "member"), _uint(f[1], "incarnation"), _id(f[2], "sender"))


def _dead(f: list[Any]) -> Dead:
    _arity(f, 3, "dead")
    return Dead(_id(f[0], "member"), _uint(f[1], "incarnation"), _id(f[2], "sender"))


_STATES = {int(s): s for s in MemberState}


def _record(r: Any) -> MemberRecord:
    if type(r) is not list or len(r) != 5:
        raise DecodeError("push/pull record is not [member, addr, incarnation, state, meta]")
    state = _STATES.get(r[3]) if type(r[3]) is int else None
    if state is None:
        raise DecodeError("push/pull record has an unknown member state")
    return MemberRecord(
        _id(r[0], "member"), _addr(r[1]), _uint(r[2], "incarnation"), state, _meta(r[4])
    )


def _push_pull(f: list[Any]) -> PushPull:
    _arity(f, 3, "push/pull")
    if type(f[2]) is not list:
        raise DecodeError("push/pull members is not an array")
    return PushPull(
        tuple(_record(r) for r in f[2]), join=_bool(f[0], "join"), reply=_bool(f[1], "reply")
    )


_DECODERS = {
    MessageType.PING: _ping,
    MessageType.INDIRECT_PING: _indirect_ping,
    MessageType.ACK: _ack,
    MessageType.NACK: _nack,
    MessageType.ALIVE: _alive,
    MessageType.SUSPECT: _suspect,
    MessageType.DEAD: _dead,
    MessageType.PUSH_PULL: _push_pull,
}
