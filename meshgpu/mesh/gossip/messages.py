"""The messages members exchange: plain frozen dataclasses, encoded by :mod:`.codec`.

Failure detection (memberlist ``net.go``): ``Ping`` -> ``Ack``; after a missed ack the prober
sends ``IndirectPing`` to a few members, which ping the target and relay its ``Ack`` back, or
answer ``Nack`` when they heard nothing (Lifeguard: a prober that misses the nacks it expected
learns that *it* is the slow one).

Dissemination: ``Alive``, ``Suspect`` and ``Dead`` carry a member's state with its incarnation
number; they are broadcast (piggybacked on every datagram and sent in gossip rounds) and are the
only messages that change membership. A ``Dead`` whose ``sender`` is the member itself is a
graceful leave.

Anti-entropy: ``PushPull`` carries a member's whole view over a reliable stream.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Addr = tuple[str, int]
"""A member's gossip address: host and port (UDP for datagrams, TCP for streams)."""

Meta = Mapping[str, Any]
"""Member metadata: a small map of msgpack-able values (addresses, labels, GPU summary, health,
load). Disseminated whenever it changes, with a new incarnation."""


class MemberState(enum.IntEnum):
    """A member's state in one member's view. The numbers are the wire encoding."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class Ping:
    """Are you alive? ``target`` names the intended member, so that a ping that reaches a
    different member at a reused address is not acked in its name."""

    seq: int
    target: str


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Please ping ``target`` at ``addr`` for me and relay its ack (or a nack if ``nack``)."""

    seq: int
    target: str
    addr: Addr
    nack: bool


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to ``Ping`` (or a relayed answer to ``IndirectPing``) with the same ``seq``."""

    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    """An indirect prober heard nothing from the target within its probe timeout."""

    seq: int


@dataclass(frozen=True, slots=True)
class Alive:
    """``member`` is alive at ``incarnation``, reachable at ``addr``, with ``meta``."""

    member: str
    incarnation: int
    addr: Addr
    meta: Meta = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Suspect:
    """``sender`` suspects ``member`` at ``incarnation`` (it missed a probe)."""

    member: str
    incarnation: int
    sender: str


@dataclass(frozen=True, slots=True)
class Dead:
    """``sender`` declares ``member`` dead at ``incarnation``; ``sender == member`` is a leave."""

    member: str
    incarnation: int
    sender: str


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """One member's state in a push/pull exchange."""

    member: str
    addr: Addr
    incarnation: int
    state: MemberState
    meta: Meta = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PushPull:
    """A member's whole view, sent over a stream; the receiver answers with its own
    (``reply=True``) and both merge. ``join`` marks the first exchange of a joining member (or a
    reconnect attempt to a failed one)."""

    members: tuple[MemberRecord, ...]
    join: bool = False
    reply: bool = False


Message = Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead | PushPull
"""Everything that travels between members."""

Broadcastable = Alive | Suspect | Dead
"""Messages that are gossiped (queued with a retransmit limit) rather than sent once."""
