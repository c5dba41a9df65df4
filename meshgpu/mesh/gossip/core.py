"""The SWIM + Lifeguard gossip core: a pure, synchronous, deterministic state machine.

Sans-I/O (the h11 / etcd-io/raft shape): the core never touches a socket, a clock or a global
random source. Time comes in as ``now`` arguments (seconds on any monotonic scale), randomness
from the ``random.Random`` it is given, packets as bytes, and everything it wants sent comes back
as :class:`Outgoing` values. The same object runs under the trio shell and in the simulator.

How a shell drives it:

* **Timers**: sleep until :meth:`Gossip.next_deadline` (or a packet), then call
  :meth:`Gossip.tick` with the current time and send what it returns. Any call can move the
  deadline earlier (a confirmation that shortens a suspicion), so re-read it after each one.
* **Datagrams**: call :meth:`Gossip.receive` with each UDP payload and its source address; a
  :class:`DecodeError` means a bad packet to drop.
* **Streams** (TCP): an :class:`Outgoing` with ``stream=True`` asks the shell to connect to
  ``to``, write ``data``, read one reply packet before ``deadline`` and pass it to
  :meth:`Gossip.receive` (a failed or timed-out exchange is simply dropped). For an accepted
  connection, pass the packet read from it to :meth:`Gossip.receive_stream` and write back the
  reply it returns. Push/pull (periodic anti-entropy, join, reconnect) and the fallback ping use
  streams; the shell frames packets on them (a length prefix) and bounds their size.
* **Events**: drain :meth:`Gossip.events` after each call; they describe changes in this member's
  view (joined, updated, suspect, alive, dead, left, reaped), this member's own included.

The rules that update the view are in :mod:`.state` (memberlist ``state.go``), failure detection
in :mod:`.probe`; this module owns the timers, the gossip rounds, push/pull, reconnects, reaping
and the packing of datagrams.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import codec
from .awareness import Awareness
from .config import GossipConfig
from .errors import ConfigError, DecodeError, MetaTooLarge
from .events import EventKind, MemberEvent
from .members import Member, MemberInfo, MemberTable
from .messages import (
    Ack,
    Addr,
    Alive,
    Broadcastable,
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
from .probe import Prober
from .queue import BroadcastQueue
from .state import MembershipState
from .timers import Timer, TimerKind, Timers

_GONE = (MemberState.DEAD, MemberState.LEFT)
_PING_ROOM = 64  # bytes kept free beside any broadcast: a ping or ack with a 40-character id


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Something to send: ``data`` (an encoded packet) to ``to``.

    ``stream=False``: one UDP datagram (at most ``udp_buffer_size`` bytes), fire and forget.
    ``stream=True``: a request over a reliable stream (TCP); the shell reads one reply packet
    before ``deadline`` and hands it to :meth:`Gossip.receive`. ``messages`` are the decoded
    contents of ``data``, for logging and tests."""

    to: Addr
    data: bytes
    messages: tuple[Message, ...]
    stream: bool = False
    deadline: float | None = None


class Gossip:
    """One member's SWIM + Lifeguard state machine.

    ``self_id`` names this member everywhere (meshgpu uses the node id from its certificate);
    ``addr`` is where peers reach its gossip port; ``meta`` its initial metadata; ``rng`` the
    only source of randomness (seed it for reproducible runs). ``incarnation`` is the last
    incarnation this member used, if known (persist :attr:`incarnation`, or pass a wall-clock
    value); the core starts one above it. A member that restarts lower is held dead by peers
    until it hears the verdict (its join's push/pull carries it) and refutes (memberlist#311)."""

    def __init__(
        self,
        self_id: str,
        addr: Addr,
        meta: Meta | None = None,
        config: GossipConfig | None = None,
        rng: random.Random | None = None,
        *,
        incarnation: int = 0,
    ) -> None:
        self._cfg = config if config is not None else GossipConfig.lan()
        self._cfg.validate()
        self._rng = rng if rng is not None else random.Random(self_id)
        if not self_id or len(self_id) > codec.MAX_ID_LEN:
            raise ConfigError(f"member id must have 1-{codec.MAX_ID_LEN} characters")
        self._me = Member(self_id, addr, incarnation + 1, MemberState.ALIVE, 0.0, {})
        meta = dict(meta or {})
        self._check_meta(meta)
        self._me.meta = meta
        self._members = MemberTable(self._rng)
        self._members.add(self._me)
        self._queue = BroadcastQueue()
        self._awareness = Awareness(self._cfg.awareness_max_multiplier, enabled=self._cfg.lifeguard)
        self._timers = Timers()
        self._out: list[Outgoing] = []
        self._started: float | None = None
        self.stats: Counter[str] = Counter()
        """Counts of protocol actions (``suspects``, ``refutes``, ``deaths``, ``push_pulls``, ...)
        for metrics."""
        self._state = MembershipState(
            self._me,
            self._cfg,
            self._members,
            self._queue,
            self._timers,
            self._awareness,
            self.stats,
        )
        self._prober = Prober(
            self_id=self_id,
            config=self._cfg,
            members=self._members,
            timers=self._timers,
            awareness=self._awareness,
            rng=self._rng,
            send=self._send,
            send_stream=self._send_stream,
            suspect=self._state.probe_failed,
        )

    # ================================================================== public API

    @property
    def id(self) -> str:
        return self._me.id

    @property
    def config(self) -> GossipConfig:
        return self._cfg

    @property
    def incarnation(self) -> int:
        """This member's current incarnation (persist it to restart above it)."""
        return self._me.incarnation

    @property
    def health_score(self) -> int:
        """Lifeguard's awareness score: 0 is healthy; probe intervals are multiplied by
        ``score + 1``."""
        return self._awareness.score

    @property
    def left(self) -> bool:
        return self._state.left

    @property
    def leave_done(self) -> bool:
        """After :meth:`leave`: the leave broadcast has been sent its full number of times (or
        nobody is left to tell), so the shell may stop."""
        return self._state.leave_done

    @property
    def probing(self) -> str | None:
        """The member being probed right now, if any."""
        return self._prober.probing

    def members(self) -> list[MemberInfo]:
        """Every member this one knows, itself included, dead and left ones until reaped."""
        return [m.info() for m in self._members]

    def member(self, member_id: str) -> MemberInfo | None:
        m = self._members.get(member_id)
        return m.info() if m is not None else None

    def live_count(self) -> int:
        """Members alive or suspect, this one included."""
        return self._members.live

    def events(self) -> list[MemberEvent]:
        """Membership events since the last call, oldest first."""
        events, self._state.events = self._state.events, []
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work; ``None`` before the first call that passes a time."""
        return self._timers.next_deadline()

    def pending_broadcasts(self) -> list[tuple[Broadcastable, int]]:
        """Queued broadcasts with their transmission counts (introspection and tests)."""
        return self._queue.pending()

    def tick(self, now: float) -> list[Outgoing]:
        """Fire every timer due by ``now`` (probes, gossip rounds, suspicion expiries, push/pull,
        reconnects, reaping) and return what to send."""
        self._ensure_started(now)
        pop = self._timers.pop_due
        while (timer := pop(now)) is not None:
            self._fire(timer, now)
        return self._flush()

    def receive(self, now: float, from_addr: Addr, data: bytes) -> list[Outgoing]:
        """Handle a datagram, or the reply read back on a stream this core asked for. Raises
        :class:`DecodeError` for a malformed packet (nothing changes then)."""
        return self.receive_messages(now, from_addr, codec.decode(data))

    def receive_messages(
        self, now: float, from_addr: Addr, messages: Iterable[Message]
    ) -> list[Outgoing]:
        """:meth:`receive` for messages already decoded."""
        self._ensure_started(now)
        for msg in messages:
            self._handle(msg, from_addr, now)
        return self._flush()

    def receive_stream(self, now: float, from_addr: Addr, data: bytes) -> bytes | None:
        """Handle a packet that arrived on an accepted stream; returns the reply packet to write
        back on the same stream (an ``Ack`` to a ``Ping``, this member's state to a
        ``PushPull``), or ``None``. Raises :class:`DecodeError` for a malformed packet or one that
        does not belong on a stream."""
        messages = codec.decode(data)
        self._ensure_started(now)
        reply: list[Message] = []
        for msg in messages:
            if type(msg) is Ping:
                if msg.target == self._me.id:
                    reply.append(Ack(msg.seq))
            elif type(msg) is PushPull:
                # memberlist answers with its state before merging the remote one, so the reply
                # is this member's view as it was, not an echo of what the peer just sent.
                if not msg.reply:
                    reply.append(self.push_pull_state(join=msg.join, reply=True))
                self._state.merge(msg.members, now)
            else:
                raise DecodeError(f"{type(msg).__name__} does not belong on a stream")
        self._flush()  # merges only queue broadcasts; nothing is sent directly
        return codec.encode(reply) if reply else None

    def join(self, now: float, seeds: Iterable[Addr]) -> list[Outgoing]:
        """Start joining a cluster through ``seeds`` (addresses of any members): one push/pull
        with each, over streams. Also queues this member's ``Alive`` so that it spreads by
        gossip. Call again (with other seeds) if no member appears."""
        self._ensure_started(now)
        if self._state.left:
            return []
        self._state.broadcast(self._me.id, self._state.alive_message())
        state = self.push_pull_state(join=True)
        for seed in seeds:
            if seed != self._me.addr:
                self._send_stream(seed, [state], now + self._cfg.tcp_timeout)
        return self._flush()

    def leave(self, now: float) -> list[Outgoing]:
        """Leave gracefully: broadcast a ``Dead`` about itself (peers record *left*, not
        *dead*) and stop probing. Keep ticking until :attr:`leave_done` (or a timeout), so the
        broadcast gets out, then stop the shell."""
        self._ensure_started(now)
        if self._state.left:
            return []
        self._prober.stop()
        self._state.leave(now)
        self._gossip(now)  # don't wait for the next round
        return self._flush()

    def update_meta(self, meta: Meta) -> None:
        """Replace this member's metadata; it is disseminated with a new incarnation at the next
        datagram. Raises :class:`MetaTooLarge` if its encoding exceeds ``meta_max_size`` or
        leaves the alive message too big for a datagram.
        Every change costs a broadcast to the whole cluster: rate-limit fast-moving values."""
        meta = dict(meta)
        self._check_meta(meta)
        if self._state.left or meta == self._me.meta:
            return
        self._me.meta = meta
        self._me.incarnation += 1
        self._state.broadcast(self._me.id, self._state.alive_message())
        self._state.emit(EventKind.UPDATED, self._me)

    def push_pull_state(self, *, join: bool = False, reply: bool = False) -> PushPull:
        """This member's whole view, for a push/pull exchange (the shell sends it when this core
        asks for a stream, or the core builds it in :meth:`receive_stream`)."""
        records = tuple(
            MemberRecord(m.id, m.addr, m.incarnation, m.state, m.meta) for m in self._members
        )
        return PushPull(records, join=join, reply=reply)

    def merge_remote_state(self, now: float, state: PushPull) -> list[Outgoing]:
        """Merge a peer's view (memberlist ``mergeState``): alive records as ``Alive``, left
        ones as a leave, dead or suspect ones only as a *suspicion* (a peer's verdict is not
        trusted outright: the member gets a chance to refute)."""
        self._ensure_started(now)
        self._state.merge(state.members, now)
        return self._flush()

    def bootstrap(self, now: float, records: Iterable[MemberRecord]) -> None:
        """Install known members without gossiping about them: for a member restarting from a
        persisted member list, or a simulator that starts from a converged cluster. Alive
        records of unknown members are added; others are ignored. No events: the caller already
        knows these members."""
        me = self._me.id
        fresh: list[Member] = []
        seen: set[str] = set()
        for r in records:
            if r.member == me or r.state is not MemberState.ALIVE or r.member in seen:
                continue
            if self._members.get(r.member) is None:
                seen.add(r.member)
                fresh.append(
                    Member(r.member, r.addr, r.incarnation, MemberState.ALIVE, now, r.meta)
                )
        self._members.add_many(fresh)
        # Started after the members are in, so that the push/pull period is scaled for them.
        self._ensure_started(now)

    # ================================================================== timers

    def _ensure_started(self, now: float) -> None:
        if self._started is not None:
            return
        self._started = now
        cfg, rng, timers = self._cfg, self._rng, self._timers
        self._me.state_since = now
        self._state.emit(EventKind.JOINED, self._me)
        self._prober.start(now)
        timers.add(now + rng.uniform(0, cfg.gossip_interval), TimerKind.GOSSIP)
        if cfg.push_pull_interval > 0:
            # Staggered over the whole (scaled) period rather than memberlist's base interval,
            # so that a cluster started at once does not do all its full syncs together.
            period = cfg.push_pull_period(self._members.live)
            timers.add(now + rng.uniform(0, period), TimerKind.PUSH_PULL)
        if cfg.reconnect_interval > 0:
            timers.add(now + rng.uniform(0, cfg.reconnect_interval), TimerKind.RECONNECT)
        timers.add(now + cfg.reap_interval, TimerKind.REAP)

    def _fire(self, timer: Timer, now: float) -> None:
        kind = timer.kind
        cfg = self._cfg
        if kind is TimerKind.GOSSIP:
            self._gossip(now)
            self._timers.add(_next_period(timer.due, cfg.gossip_interval, now), TimerKind.GOSSIP)
        elif kind is TimerKind.SUSPICION:
            self._state.suspicion_expired(timer.key, now)
        elif kind is TimerKind.PUSH_PULL:
            self._push_pull(now)
            period = cfg.push_pull_period(self._members.live)
            self._timers.add(now + period, TimerKind.PUSH_PULL)
        elif kind is TimerKind.RECONNECT:
            self._reconnect(now)
            self._timers.add(now + cfg.reconnect_interval, TimerKind.RECONNECT)
        elif kind is TimerKind.REAP:
            self._reap(now)
            self._timers.add(now + cfg.reap_interval, TimerKind.REAP)
        else:
            self._prober.on_timer(timer, now)

    def _gossip(self, now: float) -> None:
        """One gossip round (memberlist ``gossip``): queued broadcasts to a few random members,
        including recently dead ones, so that they learn of their death and can refute."""
        me, grace = self._me, self._cfg.gossip_to_the_dead_time

        def target(m: Member) -> bool:
            if m is me:
                return False
            if m.state is MemberState.DEAD:
                return now - m.state_since <= grace
            return m.state is not MemberState.LEFT

        if not self._queue:
            return
        budget = self._cfg.udp_buffer_size - codec.PACKET_OVERHEAD
        limit = self._cfg.retransmit_limit(self._members.live)
        for peer in self._members.k_random(self._cfg.gossip_nodes, target):
            extra = self._queue.get(budget, limit)
            if not extra:
                break
            self._out.append(
                Outgoing(
                    peer.addr,
                    codec.pack([enc for _, enc in extra]),
                    tuple(msg for msg, _ in extra),
                )
            )

    def _push_pull(self, now: float) -> None:
        me = self._me
        peers = self._members.k_random(1, lambda m: m is not me and m.state is MemberState.ALIVE)
        if peers and not self._state.left:
            self.stats["push_pulls"] += 1
            self._send_stream(peers[0].addr, [self.push_pull_state()], now + self._cfg.tcp_timeout)

    def _reconnect(self, now: float) -> None:
        """Serf's reconnect: try a push/pull with a random failed member, with probability
        failed/alive so that the cluster as a whole tries each about once per interval. Heals
        partitions that lasted long enough for both sides to declare the other dead."""
        if self._state.left:
            return
        failed = [m for m in self._members if m.state is MemberState.DEAD]
        if not failed:
            return
        if self._rng.random() > len(failed) / max(1, self._members.live):
            return
        target = self._rng.choice(failed)
        self.stats["reconnects"] += 1
        state = self.push_pull_state(join=True)
        self._send_stream(target.addr, [state], now + self._cfg.tcp_timeout)

    def _reap(self, now: float) -> None:
        cfg = self._cfg
        for m in [m for m in self._members if m.state in _GONE]:
            keep = cfg.reconnect_timeout if m.state is MemberState.DEAD else cfg.tombstone_timeout
            if m is not self._me and now - m.state_since >= keep:
                self._members.remove(m.id)
                self._state.emit(EventKind.REAPED, m)

    # ================================================================== sending

    def _send(self, to: Addr, messages: list[Message], piggyback: bool) -> None:
        """Queue one datagram, topped up with broadcasts to ``udp_buffer_size`` (memberlist
        piggybacks on every packet it sends: pings, acks and nacks spread news for free)."""
        encoded = [codec.encode_message(m) for m in messages]
        extra: list[tuple[Broadcastable, bytes]] = []
        if piggyback and self._queue:
            budget = self._cfg.udp_buffer_size - codec.PACKET_OVERHEAD - sum(map(len, encoded))
            extra = self._queue.get(budget, self._cfg.retransmit_limit(self._members.live))
        data = codec.pack(encoded + [enc for _, enc in extra])
        self._out.append(Outgoing(to, data, tuple(messages) + tuple(m for m, _ in extra)))

    def _send_stream(self, to: Addr, messages: list[Message], deadline: float) -> None:
        self._out.append(Outgoing(to, codec.encode(messages), tuple(messages), True, deadline))

    def _flush(self) -> list[Outgoing]:
        out, self._out = self._out, []
        return out

    # ================================================================== messages

    def _handle(self, msg: Message, from_addr: Addr, now: float) -> None:
        match msg:
            case Ping(seq, target):
                if target == self._me.id:
                    self._send(from_addr, [Ack(seq)], True)
            case Ack(seq):
                self._prober.on_ack(seq, now)
            case Nack(seq):
                self._prober.on_nack(seq)
            case IndirectPing():
                self._prober.on_indirect_ping(msg, from_addr, now)
            case Alive():
                self._state.on_alive(msg, now)
            case Suspect():
                self._state.on_suspect(msg, now)
            case Dead():
                self._state.on_dead(msg, now)
            case PushPull(members):
                self._state.merge(members, now)

    # ================================================================== helpers

    def _check_meta(self, meta: Mapping[str, Any]) -> None:
        try:
            size = len(codec.encode_meta(meta))
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"metadata must hold plain msgpack values: {exc}") from exc
        if size > self._cfg.meta_max_size:
            raise MetaTooLarge(
                f"metadata encodes to {size} bytes, over meta_max_size={self._cfg.meta_max_size}"
            )
        # The alive message that carries it must fit one datagram beside a ping, or it could
        # never be gossiped (a long id or host name eats into the budget too).
        me = self._me
        alive = len(codec.encode_message(Alive(me.id, me.incarnation + 1, me.addr, meta)))
        room = self._cfg.udp_buffer_size - codec.PACKET_OVERHEAD - _PING_ROOM
        if alive > room:
            raise MetaTooLarge(
                f"an alive message with this metadata takes {alive} bytes, over the {room} "
                f"a datagram leaves (udp_buffer_size={self._cfg.udp_buffer_size})"
            )


def _next_period(due: float, interval: float, now: float) -> float:
    """The next tick of a fixed-rate ticker after ``now``; like Go's ``time.Ticker`` it drops the
    ticks a late member missed rather than firing them in a burst."""
    nxt = due + interval
    if nxt <= now:
        nxt = due + interval * (int((now - due) / interval) + 1)
    return nxt
