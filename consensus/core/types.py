"""The values that flow in and out of the Raft core.

Everything here is a frozen ``dataclass(slots=True)``: messages and entries are created on the hot
path (every heartbeat, every append), and pydantic's validation cost would dominate the simulator's
profile. Frozen values are also safe to hand to the runtime and keep in the unstable log at the
same time: nobody can mutate an entry the core still holds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

NONE = 0
"""The "no node" ID. Real node IDs are positive integers and are never reused after removal."""

ENTRY_OVERHEAD = 16
"""Bytes charged per entry on top of its payload when sizing append messages, so that a run of
empty entries (new leaders append one each) still counts against ``max_size_per_msg``."""


class EntryType(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    data: bytes = b""
    type: EntryType = EntryType.NORMAL


class MessageType(enum.IntEnum):
    # Local messages: never travel on the wire; RawNode refuses them from peers.
    HUP = 0
    BEAT = 1
    CHECK_QUORUM = 2
    UNREACHABLE = 3
    SNAP_STATUS = 4
    FORGET_LEADER = 5
    # Proposals and read requests are local when they enter the core but are forwarded from
    # followers to the leader, so they can also arrive from a peer (with term 0).
    PROP = 10
    READ_INDEX = 11
    TRANSFER_LEADER = 12
    # Peer messages.
    APP = 20
    APP_RESP = 21
    VOTE = 22
    VOTE_RESP = 23
    PRE_VOTE = 24
    PRE_VOTE_RESP = 25
    SNAP = 26
    HEARTBEAT = 27
    HEARTBEAT_RESP = 28
    TIMEOUT_NOW = 29
    READ_INDEX_RESP = 30


LOCAL_MESSAGES = frozenset(
    {
        MessageType.HUP,
        MessageType.BEAT,
        MessageType.CHECK_QUORUM,
        MessageType.UNREACHABLE,
        MessageType.SNAP_STATUS,
        MessageType.FORGET_LEADER,
    }
)

RESPONSE_MESSAGES = frozenset(
    {
        MessageType.APP_RESP,
        MessageType.VOTE_RESP,
        MessageType.PRE_VOTE_RESP,
        MessageType.HEARTBEAT_RESP,
        MessageType.UNREACHABLE,
        MessageType.SNAP_STATUS,
    }
)

VOTE_MESSAGES = frozenset(
    {
        MessageType.VOTE,
        MessageType.VOTE_RESP,
        MessageType.PRE_VOTE,
        MessageType.PRE_VOTE_RESP,
    }
)


@dataclass(frozen=True, slots=True)
class ConfState:
    """A complete cluster configuration.

    ``removed`` remembers every ID that ever left, so that an ID can never be reused (a reused ID
    would let a wiped node inherit votes and log positions of its predecessor).
    """

    voters: frozenset[int] = frozenset()
    learners: frozenset[int] = frozenset()
    removed: frozenset[int] = frozenset()

    def members(self) -> frozenset[int]:
        return self.voters | self.learners


@dataclass(frozen=True, slots=True)
class SnapshotMetadata:
    index: int = 0
    term: int = 0
    conf_state: ConfState = ConfState()


@dataclass(frozen=True, slots=True)
class Snapshot:
    metadata: SnapshotMetadata = SnapshotMetadata()
    data: bytes = b""


EMPTY_SNAPSHOT = Snapshot()


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message that depends on it leaves the node."""

    term: int = 0
    vote: int = NONE
    commit: int = 0


EMPTY_HARD_STATE = HardState()


@dataclass(frozen=True, slots=True)
class Message:
    type: MessageType
    to: int = NONE
    frm: int = NONE
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    snapshot: Snapshot | None = None
    reject: bool = False
    reject_hint: int = 0
    context: bytes = b""


class Role(enum.IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state worth telling the runtime about; never persisted."""

    lead: int = NONE
    role: Role = Role.FOLLOWER


@dataclass(frozen=True, slots=True)
class ReadState:
    """The answer to a ReadIndex request: serve the read once ``applied >= index``."""

    index: int
    context: bytes


def payload_size(entries: tuple[Entry, ...] | list[Entry]) -> int:
    return sum(len(e.data) for e in entries)


def entry_size(e: Entry) -> int:
    return len(e.data) + ENTRY_OVERHEAD
