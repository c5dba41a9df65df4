"""The member table: every known member's state, the probe order and random peer selection.

Probing is *randomized round robin* (SWIM §4.3, memberlist ``probe``/``resetNodes``): the table
keeps its members in a list, probes them in list order and reshuffles the list at each wrap, so
that every member is probed once per round (a bound on the time to first detection that pure
random choice lacks) while different members probe in different orders. A new member is
inserted at a random position, not appended: appended members would all be probed at the end
of everyone's round, raising detection time for the newest members.

Random selection of gossip and indirect-probe peers is memberlist's ``kRandomNodes``: draw random
positions (up to ``3 * len``) and keep those the filter accepts, so that picking 3 of 1,000
members costs a few draws rather than a scan.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .messages import Addr, MemberState, Meta


@dataclass(slots=True, eq=False)
class Member:
    """One member as this member sees it (mutable; owned by the core)."""

    id: str
    addr: Addr
    incarnation: int
    state: MemberState
    state_since: float
    meta: Meta = field(default_factory=dict)

    def info(self) -> MemberInfo:
        return MemberInfo(
            self.id, self.addr, self.incarnation, self.state, self.state_since, dict(self.meta)
        )


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """A snapshot of one member for callers of the core (events, ``members()``)."""

    id: str
    addr: Addr
    incarnation: int
    state: MemberState
    state_since: float
    """When this member entered ``state`` in this member's view (the core's clock)."""
    meta: Meta = field(default_factory=dict)


_LIVE = (MemberState.ALIVE, MemberState.SUSPECT)


class MemberTable:
    """Members by id, with the shuffled probe order and a live count."""

    __slots__ = ("_by_id", "_order", "_probe_index", "_rng", "live")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._by_id: dict[str, Member] = {}
        self._order: list[Member] = []
        self._probe_index = 0
        self.live = 0
        """Members alive or suspect, this one included (memberlist's node-count estimate)."""

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Member]:
        return iter(self._order)

    def get(self, member_id: str) -> Member | None:
        return self._by_id.get(member_id)

    def add(self, member: Member) -> None:
        """Insert a new member at a random position of the probe order."""
        self._by_id[member.id] = member
        n = len(self._order)
        self._order.append(member)
        offset = self._rng.randrange(n + 1)
        self._order[offset], self._order[n] = self._order[n], self._order[offset]
        if member.state in _LIVE:
            self.live += 1

    def add_many(self, members: list[Member]) -> None:
        """Insert many new members at once (a bootstrap), then shuffle the probe order: one
        random key per member instead of one random swap each."""
        for member in members:
            self._by_id[member.id] = member
            self._order.append(member)
            if member.state in _LIVE:
                self.live += 1
        rand = self._rng.random
        self._order.sort(key=lambda _: rand())
        self._probe_index = 0

    def remove(self, member_id: str) -> Member | None:
        """Forget a member (reaping)."""
        member = self._by_id.pop(member_id, None)
        if member is None:
            return None
        idx = self._order.index(member)
        del self._order[idx]
        if idx < self._probe_index:
            self._probe_index -= 1
        if member.state in _LIVE:
            self.live -= 1
        return member

    def set_state(self, member: Member, state: MemberState, now: float) -> None:
        """Move ``member`` to ``state`` (keeping the live count right)."""
        if member.state == state:
            return
        self.live += (state in _LIVE) - (member.state in _LIVE)
        member.state = state
        member.state_since = now

    def next_probe_target(self, self_id: str) -> Member | None:
        """The next member to probe in round-robin order: alive or suspect, not this one;
        reshuffles at each wrap. ``None`` when there is nobody to probe."""
        checked = 0
        n = len(self._order)
        while checked < n:
            if self._probe_index >= n:
                self._rng.shuffle(self._order)
                self._probe_index = 0
            member = self._order[self._probe_index]
            self._probe_index += 1
            checked += 1
            if member.id != self_id and member.state in _LIVE:
                return member
        return None

    def k_random(self, k: int, accept: Callable[[Member], bool]) -> list[Member]:
        """Up to ``k`` distinct random members that ``accept`` approves."""
        order = self._order
        n = len(order)
        chosen: list[Member] = []
        if k <= 0 or n == 0:
            return chosen
        randrange = self._rng.randrange
        for _ in range(3 * n):
            member = order[randrange(n)]
            if accept(member) and member not in chosen:
                chosen.append(member)
                if len(chosen) >= k:
                    break
        return chosen
