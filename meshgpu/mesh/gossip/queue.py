"""The transmit-limited broadcast queue: what gets piggybacked on the next datagram.

memberlist ``queue.go`` (``TransmitLimitedQueue``) semantics:

* every broadcast is *named* by the member it is about; queueing a newer one invalidates the
  older (a refutation replaces the suspicion it answers, so stale news stops spreading at once);
* :meth:`get` fills a byte budget by visiting broadcasts in order of fewest transmissions first,
  then largest first (the big ones are hardest to fit later), then newest first; everything it
  returns counts one transmission;
* a broadcast is dropped after ``retransmit_limit`` transmissions, ``retransmit_mult *
  ceil(log10(N + 1))``: enough for an epidemic to reach every member with high probability
  (each informed member forwards a constant number of copies per round), and no more.

The queue holds at most one broadcast per member, so its size is bounded by the member count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .messages import Broadcastable


@dataclass(slots=True)
class _Item:
    name: str
    message: Broadcastable
    encoded: bytes
    id: int
    transmits: int = 0
    on_done: Callable[[], None] | None = None

    def order(self) -> tuple[int, int, int]:
        return (self.transmits, -len(self.encoded), -self.id)


class BroadcastQueue:
    """Broadcasts waiting to be piggybacked, each sent a limited number of times."""

    __slots__ = ("_items", "_next_id")

    def __init__(self) -> None:
        self._items: dict[str, _Item] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._items)

    def queue(
        self,
        name: str,
        message: Broadcastable,
        encoded: bytes,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """Add a broadcast about member ``name``, replacing any older one about it. ``on_done``
        runs once the broadcast has been sent its last time or was replaced."""
        old = self._items.pop(name, None)
        if old is not None and old.on_done is not None:
            old.on_done()
        self._next_id += 1
        self._items[name] = _Item(name, message, encoded, self._next_id, on_done=on_done)

    def get(self, limit: int, transmit_limit: int) -> list[tuple[Broadcastable, bytes]]:
        """Broadcasts (with their encodings) whose encodings total at most ``limit`` bytes, each
        counted as one more transmission; those that reach ``transmit_limit`` leave the queue."""
        if not self._items or limit <= 0:
            return []
        out: list[tuple[Broadcastable, bytes]] = []
        free = limit
        # Greedy over the queue's order equals memberlist's tier walk: within a tier it takes the
        # largest message that fits, and one that did not fit never fits later (free only
        # shrinks); then it moves to the next tier.
        for item in sorted(self._items.values(), key=_Item.order):
            size = len(item.encoded)
            if size > free:
                continue
            out.append((item.message, item.encoded))
            free -= size
            item.transmits += 1
            if item.transmits >= transmit_limit:
                del self._items[item.name]
                if item.on_done is not None:
                    item.on_done()
            if free <= 0:
                break
        return out

    def pending(self) -> list[tuple[Broadcastable, int]]:
        """Queued broadcasts with their transmission counts, in sending order (for tests and
        introspection)."""
        return [(i.message, i.transmits) for i in sorted(self._items.values(), key=_Item.order)]

    def clear(self) -> None:
        """Forget everything queued (a member that shuts down)."""
        self._items.clear()
