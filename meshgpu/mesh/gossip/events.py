"""What the core reports about membership changes, for the agent (and the Raft leader) to act on.

Events are this member's *local view*: a ``DEAD`` here is one member's verdict, disseminated but
not agreed. The leader is expected to turn the decisive ones into Raft commands only after a
grace period (a member dead for ``dead_grace_s``, a GPU unhealthy in the metadata), since a
refutation can still revive a member declared dead (it then reappears as ``JOINED``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .members import MemberInfo


class EventKind(enum.Enum):
    JOINED = "joined"
    """A member is alive that was unknown, dead or left (memberlist ``NotifyJoin``)."""
    UPDATED = "updated"
    """An alive member changed its metadata or address (``NotifyUpdate``)."""
    SUSPECT = "suspect"
    """A member missed a probe; it is declared dead unless it refutes in time."""
    ALIVE = "alive"
    """A suspected member refuted the suspicion (no join: it was never considered gone)."""
    DEAD = "dead"
    """A member failed: its suspicion timed out here, or a dead verdict arrived."""
    LEFT = "left"
    """A member left gracefully (it announced its own departure)."""
    REAPED = "reaped"
    """A dead or left member was forgotten after ``reconnect_timeout``/``tombstone_timeout``."""


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """``member`` (a snapshot taken when it happened) went through ``kind``."""

    kind: EventKind
    member: MemberInfo
