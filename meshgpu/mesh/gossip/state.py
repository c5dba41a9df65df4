"""Membership rules: how news about members changes this member's view.

memberlist ``state.go`` (``aliveNode``, ``suspectNode``, ``deadNode``, ``refute``,
``mergeState``). Every member's state carries an incarnation number that only the member itself
increments:

* ``Alive`` with a higher incarnation wins over any state (a dead or left member that comes back
  rejoins); an equal or lower one is old news.
* ``Suspect`` at the current (or a higher) incarnation moves an alive member to suspect and
  starts a :class:`Suspicion`; about an already suspected member it is a confirmation, which
  shortens the timer and is re-gossiped if new. When the timer expires the member is declared
  dead.
* ``Dead`` at the current (or a higher) incarnation is final until the member refutes; when
  ``sender == member`` it is a graceful leave and the member is recorded as *left*.
* A member that hears itself suspected or declared dead (or sees an alive about itself it did
  not send) *refutes*: it bumps its incarnation above the accusation and broadcasts ``Alive``.

Every accepted change is re-broadcast (queued with a retransmit limit) so that it spreads, and
reported as a :class:`MemberEvent`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from . import codec
from .awareness import Awareness
from .config import GossipConfig
from .events import EventKind, MemberEvent
from .members import Member, MemberTable
from .messages import Alive, Broadcastable, Dead, MemberRecord, MemberState, Suspect
from .queue import BroadcastQueue
from .suspicion import Suspicion
from .timers import Timer, TimerKind, Timers

_GONE = (MemberState.DEAD, MemberState.LEFT)


class MembershipState:
    """This member's view of the cluster and the rules that update it (owned by the core)."""

    __slots__ = (
        "_awareness",
        "_cfg",
        "_me",
        "_members",
        "_queue",
        "_suspicions",
        "_timers",
        "events",
        "leave_done",
        "left",
        "stats",
    )

    def __init__(
        self,
        me: Member,
        config: GossipConfig,
        members: MemberTable,
        queue: BroadcastQueue,
        timers: Timers,
        awareness: Awareness,
        stats: Counter[str],
    ) -> None:
        self._me = me
        self._cfg = config
        self._members = members
        self._queue = queue
        self._timers = timers
        self._awareness = awareness
        self.stats = stats
        self._suspicions: dict[str, tuple[Suspicion, Timer]] = {}
        self.events: list[MemberEvent] = []
        self.left = False
        """This member has left (it no longer refutes and ignores news about itself)."""
        self.leave_done = False
        """Its leave broadcast has been sent its last time."""

    def leave(self, now: float) -> None:
        """Record this member as left and broadcast a ``Dead`` about itself with itself as the
        sender, which peers record as *left*."""
        self.left = True
        me = self._me
        self.on_dead(Dead(me.id, me.incarnation, me.id), now)
        if self._members.live == 0:
            self.leave_done = True

    def merge(self, records: Iterable[MemberRecord], now: float) -> None:
        me = self._me.id
        for r in records:
            if r.state is MemberState.ALIVE:
                self.on_alive(Alive(r.member, r.incarnation, r.addr, r.meta), now)
            elif r.state is MemberState.LEFT:
                self.on_dead(Dead(r.member, r.incarnation, r.member), now)
            else:
                self.on_suspect(Suspect(r.member, r.incarnation, me), now)

    def on_alive(self, a: Alive, now: float) -> None:
        me = self._me
        is_local = a.member == me.id
        if is_local and self.left:
            return  # an alive about us still in flight must not undo the leave
        m = self._members.get(a.member)
        if m is None:
            # Messages are immutable values: keep their metadata map rather than copying it.
            m = Member(a.member, a.addr, a.incarnation, MemberState.ALIVE, now, a.meta)
            self._members.add(m)
            self.broadcast(a.member, a)
            self.emit(EventKind.JOINED, m)
            return
        updates_addr = False
        if m.addr != a.addr:
            if m.state in _GONE:
                # A member that left or failed may come back from another address (a rebooted
                # host with a new lease); meshgpu ids come from certificates, so the id is the
                # same machine.
                updates_addr = True
            else:
                self.stats["addr_conflicts"] += 1
                return
        if is_local:
            if a.incarnation < m.incarnation:
                return
            if a.incarnation == m.incarnation and a.meta == m.meta and a.addr == m.addr:
                return
            # Someone asserts a version of us we did not send (an earlier life of this member,
            # or a forgery): outbid it.
            self.refute(a.incarnation)
            return
        if a.incarnation <= m.incarnation and not updates_addr:
            return
        self.cancel_suspicion(a.member)
        old_state, old_meta, old_addr = m.state, m.meta, m.addr
        self.broadcast(a.member, a)
        m.incarnation = a.incarnation
        m.meta = a.meta
        m.addr = a.addr
        self._members.set_state(m, MemberState.ALIVE, now)
        if old_state in _GONE:
            self.emit(EventKind.JOINED, m)
            return
        if old_state is MemberState.SUSPECT:
            self.emit(EventKind.ALIVE, m)
        if old_meta != m.meta or old_addr != m.addr:
            self.emit(EventKind.UPDATED, m)

    def probe_failed(self, member: str, incarnation: int, now: float) -> None:
        self.on_suspect(Suspect(member, incarnation, self._me.id), now)

    def on_suspect(self, s: Suspect, now: float) -> None:
        m = self._members.get(s.member)
        if m is None or s.incarnation < m.incarnation:
            return
        current = self._suspicions.get(s.member)
        if current is not None:
            suspicion, timer = current
            if suspicion.confirm(s.sender):
                # Re-gossip new confirmations so that every member's timer shrinks, not only
                # the accuser's (memberlist suspectNode).
                self.broadcast(s.member, s)
                timer.cancelled = True
                new = self._timers.add(suspicion.deadline, TimerKind.SUSPICION, s.member)
                self._suspicions[s.member] = (suspicion, new)
            return
        if m.state is not MemberState.ALIVE:
            return
        if m is self._me:
            self.refute(s.incarnation)
            return
        self.broadcast(s.member, s)
        m.incarnation = s.incarnation
        self._members.set_state(m, MemberState.SUSPECT, now)
        self.stats["suspects"] += 1
        cfg = self._cfg
        n = self._members.live
        # k confirmations bring the timer to its minimum; memberlist aims two probe intervals
        # short of suspicion_mult. A cluster too small to supply them starts at the minimum.
        k = cfg.suspicion_mult - 2 if cfg.lifeguard else 0
        if n - 2 < k:
            k = 0
        lo = cfg.suspicion_min(n)
        suspicion = Suspicion(
            s.sender, s.incarnation, now, k, lo, cfg.suspicion_max_timeout_mult * lo
        )
        timer = self._timers.add(suspicion.deadline, TimerKind.SUSPICION, s.member)
        self._suspicions[s.member] = (suspicion, timer)
        self.emit(EventKind.SUSPECT, m)

    def suspicion_expired(self, member_id: str, now: float) -> None:
        current = self._suspicions.get(member_id)
        m = self._members.get(member_id)
        if current is None or m is None or m.state is not MemberState.SUSPECT:
            return
        self.on_dead(Dead(member_id, m.incarnation, self._me.id), now)

    def cancel_suspicion(self, member_id: str) -> None:
        current = self._suspicions.pop(member_id, None)
        if current is not None:
            current[1].cancelled = True

    def on_dead(self, d: Dead, now: float) -> None:
        m = self._members.get(d.member)
        if m is None or d.incarnation < m.incarnation:
            return
        self.cancel_suspicion(d.member)
        if m.state in _GONE:
            return
        if m is self._me:
            if not self.left:
                self.refute(d.incarnation)
                return
            self.broadcast(d.member, d, self._leave_finished)
        else:
            self.broadcast(d.member, d)
        m.incarnation = d.incarnation
        left = d.member == d.sender
        self._members.set_state(m, MemberState.LEFT if left else MemberState.DEAD, now)
        self.stats["left" if left else "deaths"] += 1
        self.emit(EventKind.LEFT if left else EventKind.DEAD, m)

    def _leave_finished(self) -> None:
        self.leave_done = True

    def refute(self, accused: int) -> None:
        """Outbid an accusation about this member at incarnation ``accused``."""
        me = self._me
        me.incarnation = max(me.incarnation, accused) + 1
        # Being accused is a sign that this member may be the slow one (Lifeguard).
        self._awareness.apply_delta(1)
        self.stats["refutes"] += 1
        self.broadcast(me.id, self.alive_message())

    def alive_message(self) -> Alive:
        me = self._me
        return Alive(me.id, me.incarnation, me.addr, me.meta)

    def broadcast(
        self, name: str, msg: Broadcastable, on_done: Callable[[], None] | None = None
    ) -> None:
        self._queue.queue(name, msg, codec.encode_message(msg), on_done)

    def emit(self, kind: EventKind, m: Member) -> None:
        self.events.append(MemberEvent(kind, m.info()))
