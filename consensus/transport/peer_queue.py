"""The bounded outbound queue of one peer."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from consensus.core.types import Message

MESSAGE_OVERHEAD = 64
"""Bytes charged per queued message on top of entry payloads and context (the fixed fields)."""


def message_size(m: Message) -> int:
    """Approximate wire size of ``m``, for the queue's byte bound."""
    size = MESSAGE_OVERHEAD + len(m.context)
    for e in m.entries:
        size += len(e.data) + 16
    return size


class PeerQueue:
    """FIFO of messages for one peer, bounded by count and bytes, single consumer.

    The producer (``send_batch``) never waits: a batch that does not fit is refused whole, and
    the caller reports the peer unreachable. The consumer (the peer's sender task) takes
    *everything* queued at once, so Ready batches that piled up while the previous write was in
    flight leave in a single write (the transport's batching point)."""

    __slots__ = ("_bytes", "_items", "_max_bytes", "_max_messages", "_nonempty")

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._items: list[Message] = []
        self._bytes = 0
        self._nonempty = trio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, msgs: Sequence[Message]) -> bool:
        """Queue all of ``msgs`` (one peer's share of a Ready batch) or none; False when full."""
        size = 0
        for m in msgs:
            size += message_size(m)
        if (
            len(self._items) + len(msgs) > self._max_messages
            or self._bytes + size > self._max_bytes
        ):
            return False
        self._items.extend(msgs)
        self._bytes += size
        self._nonempty.set()
        return True

    async def get_all(self) -> list[Message]:
        """Wait until something is queued, then take all of it."""
        while not self._items:
            await self._nonempty.wait()
        return self.clear()

    def clear(self) -> list[Message]:
        """Take everything queued without waiting (possibly nothing)."""
        items = self._items
        self._items = []
        self._bytes = 0
        if self._nonempty.is_set():
            self._nonempty = trio.Event()
        return items
