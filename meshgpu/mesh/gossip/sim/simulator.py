"""A discrete-event simulator that runs many gossip cores in virtual time.

Every member is a real :class:`~meshgpu.mesh.gossip.Gossip` core; the simulator plays the shell
for all of them. One heap of events keyed by ``(virtual time, sequence number)`` holds timer
ticks, datagram deliveries, stream requests and replies, and stall boundaries of slow members.
Packets travel as the bytes the codec produced (so byte counts are real and the decoder runs on
every packet). All randomness comes from ``random.Random`` instances derived from the seed, one
stream per concern (network, each member's core, each slow member's stalls), so a seed
reproduces a run bit for bit and adding a fault does not perturb the rest.

Models:

* **Network**: one-way datagram latency ``latency + Exp(jitter)``, independent loss with
  probability ``loss``. Streams (TCP) are reliable but slower: a connection costs three one-way
  trips before the request arrives and each direction pays ``stream_rto`` when a segment would
  have been lost (retransmission); a reply after the stream's deadline is dropped, as the shell
  would have given up.
* **Partition**: members in different groups cannot reach each other (datagrams and streams
  between them vanish) until healed.
* **Killed member**: stops; packets to it vanish and streams to it fail. It can be restarted as
  a fresh core with the same id and address.
* **Slow member**, two models of an event loop that handles packets and ticks late:

  - :class:`BusyLoop`: other work hogs the loop, each scheduler pass takes ``Exp(pass_mean)``
    seconds, and each pass fires every due timer but handles only one queued packet (a trio
    receiver task reads one datagram per pass). Timers stay roughly on time while packets queue
    (up to ``inbox_limit``, the socket buffer; the rest are dropped), so acks arrive in time yet
    are read too late: the member falsely accuses healthy peers, and the broadcasts that causes
    load it further. This is the failure Lifeguard was designed for.
  - :class:`Stalls`: the loop alternates between running and stalled (a blocking call, a long
    GC pause). While stalled nothing is handled and nothing is sent; when the stall ends the
    member ticks first (every overdue timer fires, as a ticker woken in the same scheduler pass
    would) and then drains the packets that queued up meanwhile.

Invariants are checked on every event the cores report: no member is ever told about an
incarnation of another member higher than that member has used, and no member considers itself
suspect or dead.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import GossipConfig
from ..core import Gossip, Outgoing
from ..events import EventKind, MemberEvent
from ..messages import Addr, MemberRecord, MemberState, Meta

_TICK, _DGRAM, _STREAM_REQ, _STREAM_REP, _STALL_START, _STALL_END, _PASS, _CALL = range(8)


class SimInvariantError(AssertionError):
    """A simulated run broke a protocol invariant; the message names the seed and time."""


@dataclass(frozen=True, slots=True)
class NetworkModel:
    """Latency and loss of the simulated network (seconds, probabilities)."""

    latency: float = 0.0003
    """Fixed one-way delay of a datagram (a LAN hop)."""
    jitter: float = 0.0002
    """Mean of the exponential extra delay per datagram (queueing; also reorders packets)."""
    loss: float = 0.0
    """Probability that a datagram is dropped."""
    stream_rto: float = 0.2
    """Extra delay of a stream direction that would have lost a segment (Linux's minimum RTO)."""


@dataclass(frozen=True, slots=True)
class BusyLoop:
    """A member whose event loop is busy with other work: each pass takes ``Exp(pass_mean)``
    seconds and handles due timers plus one queued packet; at most ``inbox_limit`` packets wait
    (the socket buffer), later ones are dropped."""

    pass_mean: float = 0.2
    inbox_limit: int = 1000


@dataclass(frozen=True, slots=True)
class Stalls:
    """A member whose event loop stalls: it runs for ``Exp(run_mean)`` seconds, then handles
    nothing for ``Exp(stall_mean)`` seconds, and so on."""

    stall_mean: float = 2.0
    run_mean: float = 2.0


Slowness = BusyLoop | Stalls


@dataclass(slots=True, eq=False)
class SimMember:
    """One simulated member: its core and what the shell would hold around it."""

    index: int
    core: Gossip
    addr: Addr
    alive: bool = True
    tick_at: float = math.inf
    slow: Slowness | None = None
    slow_rng: random.Random | None = None
    busy: bool = False
    stalled: bool = False
    tick_pending: bool = False
    backlog: deque[tuple[int, tuple[object, ...]]] = field(default_factory=deque)
    inbox_dropped: int = 0
    past_incarnation: int = 0
    """The highest incarnation of its earlier lives (before restarts)."""
    meta: Meta = field(default_factory=dict)
    bytes_sent: int = 0
    packets_sent: int = 0


Watcher = Callable[[int, MemberEvent, float], None]
"""``watcher(observer_index, event, now)``: called for every event any core reports."""


def member_addr(index: int) -> Addr:
    """The simulated gossip address of member ``index``."""
    return (f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}", 7481)


def member_id(index: int) -> str:
    return f"node-{index:05d}"


def default_meta(index: int) -> Meta:
    """Metadata of realistic size: what a GPU host would advertise."""
    return {
        "api": f"https://{member_addr(index)[0]}:7480",
        "labels": {"zone": f"z{index % 3}"},
        "gpus": "8xH100:80GB",
        "free": 8,
        "health": "ok",
        "load": 0.25,
    }


class Simulator:
    """``n`` gossip members in virtual time. With ``converged`` (the default) every member
    starts knowing every other one (``Gossip.bootstrap``), as in a cluster that has been up for
    a while; otherwise they start alone and the scenario joins them."""

    def __init__(
        self,
        n: int,
        config: GossipConfig,
        seed: int,
        network: NetworkModel | None = None,
        *,
        converged: bool = True,
        check_invariants: bool = True,
    ) -> None:
        self.config = config
        self.seed = seed
        self.network = network or NetworkModel()
        self.now = 0.0
        self.check_invariants = check_invariants
        self._net_rng = random.Random(f"{seed}/net")
        self._heap: list[tuple[float, int, int, int, tuple[object, ...]]] = []
        self._seq = 0
        self.members: list[SimMember] = []
        self._by_addr: dict[Addr, int] = {}
        self._watchers: list[Watcher] = []
        self.dropped = 0
        self.events_handled = 0
        self._group: list[int] | None = None  # partition group of each member, None: healed
        self._last_inc: dict[tuple[int, str], int] = {}
        for _ in range(n):
            self.add_member()
        if converged:
            records = [
                MemberRecord(m.core.id, m.addr, m.core.incarnation, MemberState.ALIVE, m.meta)
                for m in self.members
            ]
            for m in self.members:
                m.core.bootstrap(0.0, records)
                m.core.events()  # the converged start is not news
                self._schedule_tick(m)

    # ------------------------------------------------------------------ setup and faults

    def add_member(self, meta: Meta | None = None) -> SimMember:
        """A new member, alone until something joins it (see :meth:`join`)."""
        index = len(self.members)
        addr = member_addr(index)
        meta = meta if meta is not None else default_meta(index)
        rng = random.Random(f"{self.seed}/member/{index}")
        core = Gossip(member_id(index), addr, meta, self.config, rng)
        m = SimMember(index, core, addr, meta=meta)
        self.members.append(m)
        self._by_addr[addr] = index
        return m

    def watch(self, watcher: Watcher) -> None:
        """Call ``watcher`` for every membership event of every core from now on."""
        self._watchers.append(watcher)

    def join(self, index: int, seeds: list[int]) -> None:
        """Member ``index`` joins through members ``seeds`` now."""
        m = self.members[index]
        self._handle_output(m, m.core.join(self.now, [self.members[s].addr for s in seeds]))

    def kill(self, index: int) -> None:
        """Member ``index`` crashes: it stops and its packets vanish."""
        self.members[index].alive = False

    def restart(self, index: int, incarnation: int = 0) -> SimMember:
        """Bring a killed member back as a fresh core (same id and address, empty view,
        ``incarnation`` as its last known one); join it with :meth:`join`."""
        m = self.members[index]
        m.past_incarnation = max(m.past_incarnation, m.core.incarnation)
        # Its own view starts over (at a possibly lower incarnation of itself).
        self._last_inc = {k: v for k, v in self._last_inc.items() if k[0] != index}
        rng = random.Random(f"{self.seed}/member/{index}/restart/{self.now}")
        m.core = Gossip(m.core.id, m.addr, m.meta, self.config, rng, incarnation=incarnation)
        m.alive = True
        m.tick_at = math.inf
        m.backlog.clear()
        self._after_call(m)
        return m

    def partition(self, *groups: list[int]) -> None:
        """Split the network: members in different ``groups`` cannot reach each other (members
        in no group form one more group)."""
        group = [len(groups)] * len(self.members)
        for g, members in enumerate(groups):
            for i in members:
                group[i] = g
        self._group = group

    def heal(self) -> None:
        """Undo :meth:`partition`."""
        self._group = None

    def _reachable(self, a: int, b: int) -> bool:
        group = self._group
        return group is None or a >= len(group) or b >= len(group) or group[a] == group[b]

    def leave(self, index: int) -> None:
        """Member ``index`` leaves gracefully; it stops once its leave broadcast is done."""
        m = self.members[index]
        self._handle_output(m, m.core.leave(self.now))

    def make_slow(self, index: int, profile: Slowness) -> None:
        """Member ``index``'s event loop turns slow as ``profile`` says, from now on."""
        m = self.members[index]
        m.slow = profile
        m.slow_rng = rng = random.Random(f"{self.seed}/slow/{index}")
        if isinstance(profile, BusyLoop):
            m.busy = True
            m.tick_at = math.inf  # passes drive it from now on; pending ticks become stale
            self._push(self.now + rng.expovariate(1.0 / profile.pass_mean), _PASS, index, ())
        else:
            self._push(self.now + rng.expovariate(1.0 / profile.run_mean), _STALL_START, index, ())

    def at(self, when: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at virtual time ``when`` (scenario steps)."""
        self._push(when, _CALL, -1, (fn,))

    # ------------------------------------------------------------------ running

    def run_until(self, t_end: float, stop: Callable[[], bool] | None = None) -> None:
        """Process events up to virtual time ``t_end`` (or until ``stop()`` is true)."""
        heap = self._heap
        members = self.members
        while heap and heap[0][0] <= t_end:
            t, _, kind, idx, payload = heapq.heappop(heap)
            self.now = t
            self.events_handled += 1
            if kind == _CALL:
                payload[0]()  # type: ignore[operator]
            else:
                m = members[idx]
                if not m.alive:
                    continue
                if kind == _TICK:
                    if t != m.tick_at:
                        continue  # superseded by an earlier deadline
                    m.tick_at = math.inf
                    if m.stalled:
                        m.tick_pending = True
                        continue
                    self._handle_output(m, m.core.tick(t))
                elif kind == _PASS:
                    self._pass(m)
                elif kind == _STALL_START:
                    self._stall(m)
                elif kind == _STALL_END:
                    self._unstall(m)
                elif m.busy:
                    if len(m.backlog) < m.slow.inbox_limit:  # type: ignore[union-attr]
                        m.backlog.append((kind, payload))
                    else:
                        m.inbox_dropped += 1
                elif m.stalled:
                    m.backlog.append((kind, payload))
                else:
                    self._deliver(m, kind, payload)
            if stop is not None and stop():
                return
        self.now = max(self.now, t_end)

    def _deliver(self, m: SimMember, kind: int, payload: tuple[object, ...]) -> None:
        now = self.now
        if kind == _DGRAM:
            src, data = payload
            self._handle_output(m, m.core.receive(now, src, data))  # type: ignore[arg-type]
        elif kind == _STREAM_REQ:
            src_index, data, deadline = payload
            src = self.members[src_index]  # type: ignore[index]
            reply = m.core.receive_stream(now, src.addr, data)  # type: ignore[arg-type]
            self._after_call(m)
            if reply is not None:
                m.bytes_sent += len(reply)
                m.packets_sent += 1
                when = now + self._one_way() + self._rto()
                if when <= deadline and self._reachable(m.index, src.index):  # type: ignore[operator]
                    self._push(when, _STREAM_REP, src.index, (m.addr, reply))
        elif kind == _STREAM_REP:
            src, data = payload
            self._handle_output(m, m.core.receive(now, src, data))  # type: ignore[arg-type]

    def _pass(self, m: SimMember) -> None:
        """One pass of a busy member's loop: due timers, then one queued packet."""
        assert isinstance(m.slow, BusyLoop) and m.slow_rng is not None
        deadline = m.core.next_deadline()
        if deadline is not None and deadline <= self.now:
            self._handle_output(m, m.core.tick(self.now))
        if m.backlog:
            kind, payload = m.backlog.popleft()
            self._deliver(m, kind, payload)
        nxt = self.now + m.slow_rng.expovariate(1.0 / m.slow.pass_mean)
        self._push(nxt, _PASS, m.index, ())

    def _stall(self, m: SimMember) -> None:
        assert isinstance(m.slow, Stalls) and m.slow_rng is not None
        m.stalled = True
        stall = m.slow_rng.expovariate(1.0 / m.slow.stall_mean)
        self._push(self.now + stall, _STALL_END, m.index, ())

    def _unstall(self, m: SimMember) -> None:
        assert isinstance(m.slow, Stalls) and m.slow_rng is not None
        m.stalled = False
        # Timers first: the ticker's deadline passed during the stall, and it runs before the
        # receiver has drained the socket.
        if m.tick_pending or m.core.next_deadline() is not None:
            m.tick_pending = False
            self._handle_output(m, m.core.tick(self.now))
        backlog, m.backlog = m.backlog, deque()
        for kind, payload in backlog:
            if not m.alive:
                break
            self._deliver(m, kind, payload)
        run = m.slow_rng.expovariate(1.0 / m.slow.run_mean)
        self._push(self.now + run, _STALL_START, m.index, ())

    # ------------------------------------------------------------------ plumbing

    def _push(self, when: float, kind: int, index: int, payload: tuple[object, ...]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, index, payload))

    def _one_way(self) -> float:
        net = self.network
        return net.latency + (self._net_rng.expovariate(1.0 / net.jitter) if net.jitter > 0 else 0)

    def _rto(self) -> float:
        net = self.network
        return net.stream_rto if net.loss > 0 and self._net_rng.random() < net.loss else 0.0

    def _handle_output(self, m: SimMember, out: list[Outgoing]) -> None:
        now = self.now
        loss = self.network.loss
        rng = self._net_rng
        for o in out:
            m.bytes_sent += len(o.data)
            m.packets_sent += 1
            target = self._by_addr.get(o.to)
            if target is None or not self._reachable(m.index, target):
                self.dropped += 1
                continue
            if o.stream:
                # Connection set-up (SYN, SYN-ACK, ACK) then the request.
                when = now + 3 * self._one_way() + self._rto()
                self._push(when, _STREAM_REQ, target, (m.index, o.data, o.deadline))
            elif loss > 0 and rng.random() < loss:
                self.dropped += 1
            else:
                self._push(now + self._one_way(), _DGRAM, target, (m.addr, o.data))
        self._after_call(m)

    def _after_call(self, m: SimMember) -> None:
        events = m.core.events()
        if events:
            for ev in events:
                if self.check_invariants:
                    self._check(m, ev)
                for w in self._watchers:
                    w(m.index, ev, self.now)
        if m.core.leave_done:
            m.alive = False  # the shell stops once the leave broadcast is out
            return
        self._schedule_tick(m)

    def _schedule_tick(self, m: SimMember) -> None:
        if m.busy:
            return  # its loop's passes fire its timers
        d = m.core.next_deadline()
        if d is not None and d < m.tick_at:
            m.tick_at = d
            self._push(d, _TICK, m.index, ())

    def _check(self, observer: SimMember, ev: MemberEvent) -> None:
        info = ev.member
        subject = self._by_addr.get(info.addr)
        if subject is not None and self.members[subject].core.id == info.id:
            sm = self.members[subject]
            true_inc = max(sm.core.incarnation, sm.past_incarnation)
            if info.incarnation > true_inc:
                raise SimInvariantError(
                    f"seed {self.seed} t={self.now:.3f}: {observer.core.id} saw {info.id} at "
                    f"incarnation {info.incarnation}, above the {true_inc} it ever used"
                )
        key = (observer.index, info.id)
        if ev.kind is EventKind.REAPED:
            self._last_inc.pop(key, None)
        elif info.incarnation < self._last_inc.get(key, -1):
            raise SimInvariantError(
                f"seed {self.seed} t={self.now:.3f}: {observer.core.id}'s view of {info.id} went "
                f"back from incarnation {self._last_inc[key]} to {info.incarnation}"
            )
        else:
            self._last_inc[key] = info.incarnation
        if info.id == observer.core.id and info.state in (MemberState.SUSPECT, MemberState.DEAD):
            raise SimInvariantError(
                f"seed {self.seed} t={self.now:.3f}: {info.id} considers itself {info.state.name}"
            )

    # ------------------------------------------------------------------ measurements

    def bytes_sent(self) -> int:
        return sum(m.bytes_sent for m in self.members)
