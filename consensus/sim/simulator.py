"""The discrete-event simulator: virtual time, an event heap, real cores, and the heal phase.

Every event is ``(time_us, sequence_no, kind, a, b)`` on one heap; the sequence number makes
ties deterministic. All randomness comes from per-concern streams seeded from the run's seed
(``random.Random(f"{seed}/network")`` and so on), so a seed replays bit for bit, and adding draws
to one concern leaves the others' sequences unchanged.

A run has three phases:

1. **chaos**: ``events`` events of workload (proposals, reads, membership changes, transfers,
   compaction) under the nemesis (crashes that tear unsynced writes, restarts, partitions,
   pauses, loss, duplication, reordering);
2. **heal**: every fault stops, crashed nodes restart; a stable leader must appear within
   ``LIVENESS_ELECTION_TIMEOUTS`` election timeouts;
3. **converge**: every member of the final configuration must apply the whole log, which
   includes every proposal that was ever acknowledged (applied anywhere).

The checker runs inside every event (see ``checker``); the first violation ends the run.
"""

from __future__ import annotations

import heapq
import random
import traceback
from dataclasses import dataclass, field

from consensus.core import ConfState, Message, MessageType, Ready, Role

from . import actions, events
from .checker import Checker, Violation
from .network import Network
from .node import SimNode
from .profile import TICK_US, Profile, draw_profile
from .trace import fmt_msg, fmt_ready

MT = MessageType

EV_TICK = events.TICK
EV_DELIVER = events.DELIVER
EV_SYNC = events.SYNC
EV_SNAP_REPORT = events.SNAP_REPORT
EV_RESTART = events.RESTART
EV_WORKLOAD = events.WORKLOAD
EV_NEMESIS = events.NEMESIS
EV_HEAL_NETWORK = events.HEAL_NETWORK
EV_CRASH = events.CRASH
EV_ISOLATE = events.ISOLATE
EV_UNPAUSE = events.UNPAUSE

MAX_READY_PER_PUMP = 1000
LIVENESS_ELECTION_TIMEOUTS = 10
CONVERGENCE_ELECTION_TIMEOUTS = 100


@dataclass(slots=True)
class SeedResult:
    seed: int
    violation: Violation | None
    events: int
    virtual_us: int
    stats: dict[str, int] = field(default_factory=dict)
    trace: list[str] | None = None

    @property
    def ok(self) -> bool:
        return self.violation is None


class Simulator:
    def __init__(
        self, seed: int, nodes: int = 5, events: int = 10_000, trace: bool = False
    ) -> None:
        if nodes < 1:
            raise ValueError("at least one node")
        self.seed = seed
        self.n_initial = nodes
        self.max_events = events
        self.profile: Profile = draw_profile(random.Random(f"{seed}/profile"))
        self.rng_net = random.Random(f"{seed}/network")
        self.rng_fault = random.Random(f"{seed}/faults")
        self.rng_work = random.Random(f"{seed}/workload")
        self.rng_disk = random.Random(f"{seed}/disk")
        self.rng_crash = random.Random(f"{seed}/crashpoints")
        self.net = Network(self.rng_net, self.profile.network)
        self.checker = Checker()
        self.heap: list[tuple[int, int, int, object, object]] = []
        self.seq = 0
        self.now = 0
        self.nodes: dict[int, SimNode] = {}
        self.next_id = nodes + 1
        self.healing = False
        self.processed = 0
        self.trace: list[str] | None = [] if trace else None
        self.stats: dict[str, int] = {}
        cs = ConfState(frozenset(range(1, nodes + 1)))
        for nid in range(1, nodes + 1):
            self.add_node(nid, cs)

    # -- plumbing ---------------------------------------------------------------------------
    def push(self, t: int, kind: int, a: object = None, b: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def log(self, line: str) -> None:
        if self.trace is not None:
            self.trace.append(f"{self.now / 1000:10.3f} {line}")

    def add_node(self, nid: int, bootstrap: ConfState | None) -> SimNode:
        skew = self.profile.tick_skew
        tick_us = int(TICK_US * (1 + self.rng_fault.uniform(-skew, skew)))
        n = SimNode(nid, bootstrap, tick_us, self.profile.core)
        self.nodes[nid] = n
        self.start_node(n)
        return n

    def start_node(self, n: SimNode) -> None:
        n.start(self.seed)
        self.checker.on_restart(n)
        self.log(
            f"n{n.id} start inc={n.incarnation} {n.disk.hard_state} last={n.disk.last_index()}"
        )
        self.push(self.now + self.rng_fault.randrange(n.tick_us), EV_TICK, n.id, n.tick_gen)

    def election_timeout_us(self) -> int:
        slowest = max(n.tick_us for n in self.nodes.values())
        return self.profile.core.election_tick * slowest

    # -- driving one node ---------------------------------------------------------------------
    def pump(self, n: SimNode) -> None:
        """Hand out Ready batches until the node has nothing more or waits for an fsync."""
        rn = n.rn
        batches = 0
        while n.alive and n.busy is None and rn is not None and rn.has_ready():
            batches += 1
            if batches > MAX_READY_PER_PUMP:
                raise Violation("ready-livelock", f"n{n.id} keeps producing Ready batches")
            rd = rn.ready()
            if self.trace is not None:
                self.log(f"n{n.id} ready {fmt_ready(rd)}")
            if rd.entries:
                self.checker.on_new_entries(n, rd.entries)
            n.disk.write(rd.snapshot, rd.entries, rd.hard_state)
            if rd.must_sync:
                n.busy = rd
                self.push(self.now + self.fsync_us(), EV_SYNC, n.id, n.incarnation)
                return
            self.complete(n, rd)

    def fsync_us(self) -> int:
        rng = self.rng_disk
        d = 50 + int(rng.expovariate(1 / 300))
        if self.profile.slow_disk and rng.random() < self.profile.slow_disk:
            d += rng.randrange(5_000, 60_000)
        return d

    def complete(self, n: SimNode, rd: Ready) -> None:
        """The writes of ``rd`` are on disk: mirror, send, apply, advance."""
        before = n.disk.hard_state
        if rd.must_sync:
            n.disk.sync()
            self.checker.on_durable(n, before)
        st = n.storage
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
        if rd.entries:
            st.append(rd.entries)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        msgs = rd.messages
        crash_at = self.crash_point(n, rd)
        for k, m in enumerate(msgs):
            if k == crash_at:
                self.crash_mid_ready(n, f"after persisting, {k}/{len(msgs)} messages sent")
                return
            self.checker.on_send(n, m)
            self.send(n, m)
        if crash_at == len(msgs):
            self.crash_mid_ready(n, "after sending, before applying")
            return
        if rd.snapshot is not None:
            self.checker.on_restore(n, rd.snapshot)
        for e in rd.committed_entries:
            self.checker.on_apply(n, e)
        for rs in rd.read_states:
            self.checker.on_read_state(n, rs)
        n.busy = None
        assert n.rn is not None
        n.rn.advance(rd)

    def crash_point(self, n: SimNode, rd: Ready) -> int | None:
        """Where in this Ready's processing the node crashes, if it does.

        Only leader batches that carry new entries, a commit or a new role are candidates:
        those are the moments when a crash leaves entries half replicated.
        """
        p = self.profile.crash_in_ready
        if not p or self.healing or n.rn is None or n.rn.raft.role is not Role.LEADER:
            return None
        if rd.soft_state is not None:
            p = self.profile.crash_new_leader
        elif not rd.entries and rd.hard_state is None:
            return None
        rng = self.rng_crash
        if rng.random() >= p:
            return None
        return rng.randrange(len(rd.messages) + 1)

    def crash_mid_ready(self, n: SimNode, where: str) -> None:
        self.checker.after_event(n)  # what it decided in memory (e.g. a commit) counts
        self.count("crashes_in_ready")
        self.log(f"n{n.id} crashes inside a Ready: {where}")
        actions.crash(self, n)

    def send(self, n: SimNode, m: Message) -> None:
        if m.to not in self.nodes:
            return
        delays = self.net.deliveries(n.id, m.to)
        if m.type is MT.SNAP:
            # The transport knows whether the snapshot stream completed.
            self.count("snapshots_sent")
            when = self.now + (delays[0] if delays else 5_000)
            self.push(when, EV_SNAP_REPORT, (n.id, n.incarnation), (m.to, bool(delays)))
        if not delays:
            if not self.net.link_up(n.id, m.to) and n.rn is not None:
                n.rn.report_unreachable(m.to)
            return
        for d in delays:
            self.push(self.now + d, EV_DELIVER, m, n.id)

    def paused(self, n: SimNode, kind: int, a: object, b: object) -> bool:
        """Hold the event while ``n`` is paused (a stopped process reads nothing)."""
        if self.now < n.paused_until:
            n.deferred.append((kind, a, b))
            return True
        return False

    def pause(self, n: SimNode, until: int) -> None:
        if until > n.paused_until:
            n.paused_until = until
            self.push(until, EV_UNPAUSE, n.id, until)
            self.log(f"pause n{n.id} until {until / 1000:.3f}")

    def unpause(self, n: SimNode) -> None:
        """Release everything held during the pause, in arrival order."""
        n.paused_until = 0
        held, n.deferred = n.deferred, []
        for kind, a, b in held:
            self.push(self.now, kind, a, b)

    # -- events -----------------------------------------------------------------------------
    def handle(self, kind: int, a: object, b: object) -> SimNode | None:
        """Process one event; returns the node whose Ready loop and checks must run next."""
        if kind == EV_DELIVER:
            assert isinstance(a, Message)
            n = self.nodes[a.to]
            if not n.alive or self.paused(n, kind, a, b):
                return None
            if self.trace is not None:
                self.log(f"n{n.id} recv {fmt_msg(a)}")
            assert n.rn is not None
            n.rn.step(a)
            return n
        if kind == EV_TICK:
            assert isinstance(a, int)
            n = self.nodes[a]
            if not n.alive or b != n.tick_gen:
                return None  # a superseded chain (the node crashed, or was unpaused)
            if self.now < n.paused_until:
                # A stopped process does not tick; its ticker resumes after the pause.
                self.push(n.paused_until + n.tick_us, EV_TICK, a, b)
                return None
            assert n.rn is not None
            n.rn.tick()
            self.push(self.now + n.tick_us, EV_TICK, a, b)
            return n
        if kind == EV_SYNC:
            assert isinstance(a, int)
            n = self.nodes[a]
            if not n.alive or b != n.incarnation or n.busy is None:
                return None
            if self.paused(n, kind, a, b):
                return None
            self.complete(n, n.busy)
            return n
        if kind == EV_SNAP_REPORT:
            (lid, inc), (to, ok) = a, b  # type: ignore[misc]
            n = self.nodes[lid]
            if not n.alive or inc != n.incarnation or self.paused(n, kind, a, b):
                return None
            self.log(f"n{n.id} report-snapshot n{to} ok={ok}")
            assert n.rn is not None
            n.rn.report_snapshot(to, ok)
            return n
        if kind == EV_RESTART:
            assert isinstance(a, int)
            n = self.nodes[a]
            if n.alive:
                return None
            self.start_node(n)
            return n
        if kind == EV_WORKLOAD:
            if not self.healing:
                actions.workload(self)
                mean = self.profile.workload_mean_us
                self.push(self.now + int(self.rng_work.expovariate(1 / mean)) + 1, EV_WORKLOAD)
            return None
        if kind == EV_NEMESIS:
            if not self.healing:
                actions.nemesis(self)
                mean = self.profile.nemesis_mean_us
                self.push(self.now + int(self.rng_fault.expovariate(1 / mean)) + 1, EV_NEMESIS)
            return None
        if kind == EV_HEAL_NETWORK:
            if self.net.blocked:
                self.net.heal()
                self.log("heal network")
            return None
        if kind == EV_CRASH:
            assert isinstance(a, int)
            n = self.nodes[a]
            if n.alive and b == n.incarnation and not self.healing:
                actions.crash(self, n)
            return None
        if kind == EV_UNPAUSE:
            assert isinstance(a, int)
            n = self.nodes[a]
            if n.alive and b == n.paused_until:
                self.unpause(n)
            return None
        if kind == EV_ISOLATE:
            assert isinstance(a, int)
            n = self.nodes[a]
            if n.alive and b == n.incarnation and not self.healing:
                self.net.isolate(n.id, sorted(self.nodes))
                self.log(f"isolate n{n.id}")
                fault_max = self.profile.fault_max_us
                self.push(self.now + self.rng_fault.randrange(5_000, fault_max), EV_HEAL_NETWORK)
            return None
        raise AssertionError(f"unknown event {kind}")

    def after_action(self, n: SimNode) -> None:
        """Run the Ready loop and the checks after the workload or nemesis touched ``n``."""
        if n.alive:
            self.pump(n)
            led = n.led_term
            self.checker.after_event(n)
            if n.led_term != led and self.profile.kill_new_leader and not self.healing:
                self.count("elections")
                rng = self.rng_fault
                if rng.random() < self.profile.kill_new_leader:
                    # Often before its first append round trip completes, so that its empty
                    # entry (and proposals) stay on it alone.
                    delay = rng.randrange(0, 1_500 if rng.random() < 0.5 else 30_000)
                    if rng.random() < 0.5:
                        self.push(self.now + delay, EV_CRASH, n.id, n.incarnation)
                    else:
                        self.push(self.now + delay, EV_ISOLATE, n.id, n.incarnation)

    def step_once(self) -> bool:
        if not self.heap:
            return False
        t, _, kind, a, b = heapq.heappop(self.heap)
        self.now = t
        self.processed += 1
        n = self.handle(kind, a, b)
        if n is not None:
            self.after_action(n)
        return True

    # -- phases -----------------------------------------------------------------------------
    def run(self) -> SeedResult:
        violation: Violation | None = None
        try:
            self._run()
        except Violation as v:
            violation = v
        except Exception as e:  # a crash of the core is a finding too
            tb = traceback.extract_tb(e.__traceback__)[-8:]
            where = " <- ".join(f"{f.name}:{f.lineno}" for f in reversed(tb))
            violation = Violation("exception", f"{type(e).__name__}: {e} at {where}")
        if violation is not None:
            self.log(f"VIOLATION {violation}")
        self.stats["max_term"] = max(
            (n.rn.raft.term for n in self.nodes.values() if n.rn is not None), default=0
        )
        self.stats["leaders"] = len(self.checker.leaders)
        self.stats["committed"] = self.checker.max_commit
        self.stats["acked"] = len(self.checker.acked)
        self.stats["nodes_created"] = len(self.nodes)
        self.stats["torn_writes"] = sum(n.disk.torn_writes for n in self.nodes.values())
        return SeedResult(
            self.seed, violation, self.processed, self.now, dict(self.stats), self.trace
        )

    def _run(self) -> None:
        self.push(self.now + 1, EV_WORKLOAD)
        self.push(self.now + 1, EV_NEMESIS)
        while self.processed < self.max_events and self.step_once():
            pass
        self.heal()
        et = self.election_timeout_us()
        deadline = self.now + LIVENESS_ELECTION_TIMEOUTS * et
        while self.stable_leader() is None:
            if not self.step_once() or self.now > deadline:
                raise Violation(
                    "liveness",
                    f"no stable leader {LIVENESS_ELECTION_TIMEOUTS} election timeouts "
                    f"({LIVENESS_ELECTION_TIMEOUTS * et / 1000:.0f} ms) after healing; "
                    + self.describe(),
                )
        deadline = self.now + CONVERGENCE_ELECTION_TIMEOUTS * et
        while not self.converged():
            if not self.step_once() or self.now > deadline:
                raise Violation("convergence", "logs did not converge; " + self.describe())
        self.final_check()

    def heal(self) -> None:
        self.healing = True
        self.log("HEAL")
        self.net.heal()
        self.net.clean = True
        for n in self.nodes.values():
            if not n.alive:
                self.start_node(n)
            elif n.paused_until > self.now:
                # Resume it now: a fresh tick chain replaces the one deferred past the pause.
                self.unpause(n)
                n.tick_gen += 1
                self.push(self.now + n.tick_us, EV_TICK, n.id, n.tick_gen)

    def stable_leader(self) -> SimNode | None:
        best = actions.current_leader(self)
        if best is None:
            return None
        r = best.rn.raft  # type: ignore[union-attr]
        for v in r.trk.voters:
            other = self.nodes.get(v)
            if other is None or other.rn is None:
                return None
            o = other.rn.raft
            if o.term != r.term or o.lead != best.id:
                return None
        return best

    def converged(self) -> bool:
        leader = self.stable_leader()
        if leader is None:
            return False
        r = leader.rn.raft  # type: ignore[union-attr]
        last = r.log.last_index()
        if r.log.committed != last:
            return False
        for nid in r.log.conf_state.members():
            n = self.nodes.get(nid)
            if n is None or n.rn is None or n.sm_index != last or n.busy is not None:
                return False
        return True

    def final_check(self) -> None:
        leader = self.stable_leader()
        assert leader is not None and leader.rn is not None
        members = leader.rn.raft.log.conf_state.members()
        ref = self.checker.applied
        for data, idx in self.checker.acked.items():
            if ref[idx][1] != data:
                raise Violation("lost-write", f"acknowledged {data[:24]!r} at {idx} was replaced")
            for nid in members:
                if self.nodes[nid].sm_index < idx:
                    raise Violation("lost-write", f"n{nid} never applied {data[:24]!r} ({idx})")

    def describe(self) -> str:
        parts = []
        for n in self.nodes.values():
            if n.rn is None:
                parts.append(f"n{n.id}=down")
                continue
            r = n.rn.raft
            parts.append(
                f"n{n.id}={r.role.name[0]}t{r.term}l{r.lead}c{r.log.committed}"
                f"/{r.log.last_index()}a{n.sm_index}v{sorted(r.trk.voters)}"
            )
        return " ".join(parts)


def run_seed(seed: int, nodes: int = 5, events: int = 10_000, trace: bool = False) -> SeedResult:
    return Simulator(seed, nodes=nodes, events=events, trace=trace).run()
