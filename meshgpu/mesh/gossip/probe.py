"""Failure detection: the probe schedule, direct and indirect probes, and relaying for others.

One probe per probe interval (memberlist ``probe``/``probeNode``), to the next member of the
randomized round robin (:meth:`MemberTable.next_probe_target`):

1. ``Ping`` the target. If it is already suspect, the same datagram carries the ``Suspect``
   message (Lifeguard's buddy system: the accused hears of it at once and can refute).
2. No ``Ack`` within ``probe_timeout``: send ``IndirectPing`` to ``indirect_checks`` random alive
   members, and a ``Ping`` over a stream (TCP), which gets through where UDP is lossy.
3. No ack from anyone by the end of the probe interval: suspect the target. The interval is
   stretched by the awareness score, so an unhealthy member waits longer for indirect acks.

Lifeguard's health bookkeeping happens here: -1 after a successful probe; after a failed one, +1
for every nack the prober expected but did not receive (+1 flat when no peer could nack). A
healthy prober gets nacks from its helpers even when the target is really dead, so only a prober
that cannot hear its peers in time is penalized.

A member asked to ping on someone's behalf pings the target and relays its ack, or answers with a
``Nack`` after ``probe_timeout`` (memberlist ``handleIndirectPing``).

Like memberlist's ticker (which drops ticks while ``probeNode`` blocks), a probe that outlasts
the base interval delays the next one until it finishes: the next probe starts at
``max(start + probe_interval, end of this probe)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .awareness import Awareness
from .config import GossipConfig
from .members import Member, MemberTable
from .messages import Ack, Addr, IndirectPing, MemberState, Message, Nack, Ping, Suspect
from .timers import Timer, TimerKind, Timers

SendFn = Callable[[Addr, list[Message], bool], None]
"""``send(to, messages, piggyback)``: queue a datagram (topped up with broadcasts if asked)."""
StreamFn = Callable[[Addr, list[Message], float], None]
"""``send_stream(to, messages, deadline)``: ask the shell for a stream exchange."""
SuspectFn = Callable[[str, int, float], None]
"""``suspect(member, incarnation, now)``: this member's probe of ``member`` failed."""


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    addr: Addr
    incarnation: int
    start: float
    end: float
    timeout_timer: Timer
    end_timer: Timer
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    requester: Addr
    seq: int
    nack: bool
    timer: Timer


class Prober:
    """The probe state machine of one member (owned and driven by the core)."""

    __slots__ = (
        "_awareness",
        "_cfg",
        "_members",
        "_pending",
        "_probe",
        "_relays",
        "_rng",
        "_self_id",
        "_send",
        "_send_stream",
        "_seq",
        "_stopped",
        "_suspect",
        "_timers",
        "failed",
        "probes",
    )

    def __init__(
        self,
        *,
        self_id: str,
        config: GossipConfig,
        members: MemberTable,
        timers: Timers,
        awareness: Awareness,
        rng: random.Random,
        send: SendFn,
        send_stream: StreamFn,
        suspect: SuspectFn,
    ) -> None:
        self._self_id = self_id
        self._cfg = config
        self._members = members
        self._timers = timers
        self._awareness = awareness
        self._rng = rng
        self._send = send
        self._send_stream = send_stream
        self._suspect = suspect
        self._seq = 0
        self._probe: _Probe | None = None
        self._pending = False  # the probe timer fired while a probe was still running
        self._relays: dict[int, _Relay] = {}
        self._stopped = False
        self.probes = 0
        """Probes started (for statistics)."""
        self.failed = 0
        """Probes that ended in a suspicion (for statistics)."""

    def start(self, now: float) -> None:
        # A random stagger, as memberlist's triggerFunc does, so that members started together
        # do not probe in lockstep.
        self._timers.add(now + self._rng.uniform(0, self._cfg.probe_interval), TimerKind.PROBE)

    def stop(self) -> None:
        """No more probes (this member left); relays for others still answer."""
        self._stopped = True

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ------------------------------------------------------------------ timers

    def on_timer(self, timer: Timer, now: float) -> None:
        kind = timer.kind
        if kind is TimerKind.PROBE:
            if self._probe is not None:
                self._pending = True
            else:
                self._start_probe(now)
        elif kind is TimerKind.PROBE_TIMEOUT:
            self._indirect(now)
        elif kind is TimerKind.PROBE_END:
            self._fail(now)
        elif kind is TimerKind.RELAY:
            relay = self._relays.pop(timer.key, None)
            if relay is not None and relay.nack:
                self._send(relay.requester, [Nack(relay.seq)], True)

    def _start_probe(self, now: float) -> None:
        if self._stopped:
            return
        cfg = self._cfg
        self._timers.add(now + cfg.probe_interval, TimerKind.PROBE)
        target = self._members.next_probe_target(self._self_id)
        if target is None:
            return
        seq = self._next_seq()
        interval = self._awareness.scale(cfg.probe_interval)
        self._probe = _Probe(
            seq=seq,
            target=target.id,
            addr=target.addr,
            incarnation=target.incarnation,
            start=now,
            end=now + interval,
            timeout_timer=self._timers.add(now + cfg.probe_timeout, TimerKind.PROBE_TIMEOUT, seq),
            end_timer=self._timers.add(now + interval, TimerKind.PROBE_END, seq),
        )
        self.probes += 1
        ping = Ping(seq, target.id)
        if target.state is MemberState.SUSPECT and cfg.lifeguard:
            # Buddy system: the suspect learns of the accusation from the prober itself. Sent
            # without piggybacked broadcasts, as memberlist does for this compound.
            accusation = Suspect(target.id, target.incarnation, self._self_id)
            self._send(target.addr, [ping, accusation], False)
        else:
            self._send(target.addr, [ping], True)

    def _indirect(self, now: float) -> None:
        probe = self._probe
        if probe is None:
            return
        cfg = self._cfg
        self_id, target = self._self_id, probe.target

        def helper(m: Member) -> bool:
            return m.id != self_id and m.id != target and m.state is MemberState.ALIVE

        nack = cfg.lifeguard
        msg = IndirectPing(probe.seq, target, probe.addr, nack)
        for peer in self._members.k_random(cfg.indirect_checks, helper):
            self._send(peer.addr, [msg], True)
            if nack:
                probe.expected_nacks += 1
        if not cfg.disable_tcp_pings:
            self._send_stream(probe.addr, [Ping(probe.seq, target)], probe.end)

    def _fail(self, now: float) -> None:
        probe = self._probe
        if probe is None:
            return
        if probe.expected_nacks > 0:
            self._awareness.apply_delta(max(0, probe.expected_nacks - probe.nacks))
        else:
            self._awareness.apply_delta(1)
        self.failed += 1
        self._finish(now)
        # The incarnation seen when the probe started: if the target refuted meanwhile, the
        # suspicion is stale and the state rules drop it.
        self._suspect(probe.target, probe.incarnation, now)

    def _finish(self, now: float) -> None:
        probe = self._probe
        assert probe is not None
        probe.timeout_timer.cancelled = True
        probe.end_timer.cancelled = True
        self._probe = None
        if self._pending:
            self._pending = False
            self._start_probe(now)

    # ------------------------------------------------------------------ messages

    def on_ack(self, seq: int, now: float) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq:
            self._awareness.apply_delta(-1)
            self._finish(now)
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            relay.timer.cancelled = True
            self._send(relay.requester, [Ack(relay.seq)], True)

    def on_nack(self, seq: int) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq:
            probe.nacks += 1

    def on_indirect_ping(self, msg: IndirectPing, requester: Addr, now: float) -> None:
        seq = self._next_seq()
        timer = self._timers.add(now + self._cfg.probe_timeout, TimerKind.RELAY, seq)
        self._relays[seq] = _Relay(requester, msg.seq, msg.nack, timer)
        self._send(msg.addr, [Ping(seq, msg.target)], True)

    @property
    def probing(self) -> str | None:
        """The member being probed right now, if any (for tests and introspection)."""
        return self._probe.target if self._probe is not None else None
