"""ReadIndex bookkeeping on the leader (the "safe" read-only mode).

A read request records the leader's commit index, then rides on the next heartbeat round as its
context. Once a quorum acknowledges a heartbeat carrying that context (or a later one: heartbeats
are answered in order, and acknowledging a later round proves leadership at least as recently),
the leader is known to have been the leader when the read arrived, so any write completed before
the read started is at or below the recorded index. The application serves the read once it has
applied up to that index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .types import Message


@dataclass(slots=True)
class ReadIndexStatus:
    req: Message
    index: int
    acks: dict[int, bool] = field(default_factory=dict)


class ReadOnly:
    __slots__ = ("pending", "queue")

    def __init__(self) -> None:
        self.pending: dict[bytes, ReadIndexStatus] = {}
        self.queue: list[bytes] = []

    def add_request(self, index: int, m: Message) -> None:
        ctx = m.entries[0].data
        if ctx in self.pending:
            return  # a retry of a request already waiting; it will be answered once
        self.pending[ctx] = ReadIndexStatus(m, index)
        self.queue.append(ctx)

    def recv_ack(self, nid: int, ctx: bytes) -> dict[int, bool] | None:
        rs = self.pending.get(ctx)
        if rs is None:
            return None
        rs.acks[nid] = True
        return rs.acks

    def advance(self, ctx: bytes) -> list[ReadIndexStatus]:
        """Pop and return every request up to and including the one with ``ctx``."""
        try:
            i = self.queue.index(ctx)
        except ValueError:
            return []
        done = [self.pending.pop(c) for c in self.queue[: i + 1]]
        del self.queue[: i + 1]
        return done

    def last_pending_ctx(self) -> bytes:
        return self.queue[-1] if self.queue else b""
