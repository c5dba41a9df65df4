"""The measurements the gossip benchmark and the simulator tests make.

* :func:`measure_join`: a converged cluster, then one new member joins through one seed; how
  long until 99% (and all) of the members know it.
* :func:`measure_death`: a converged cluster, then one member crashes; when the first member
  suspects it, when the first declares it dead, and when 99% (and all) of the survivors have;
  also the bytes every member sends per second, before and after the crash.
* :func:`measure_false_deaths`: a cluster with packet loss and one member whose event loop
  stalls, run for a while with nobody failing; every "dead" verdict is false. Counted separately
  for verdicts about healthy members (Lifeguard's target: the slow member must not get healthy
  peers declared dead) and about the slow member itself (which really is unresponsive while
  stalled; Lifeguard does not claim to keep it alive).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ..config import GossipConfig
from ..events import EventKind, MemberEvent
from .simulator import BusyLoop, NetworkModel, Simulator, Slowness


@dataclass(frozen=True, slots=True)
class SpreadResult:
    """How a piece of news (a join, a death) reached the members. Times are seconds of virtual
    time from the event (the join call, the crash); ``None`` if never reached before the run's
    timeout."""

    members: int
    """Members that should learn the news (everyone but its subject)."""
    reached_99_s: float | None
    reached_all_s: float | None
    first_suspect_s: float | None = None
    """Deaths only: when the first member suspected the crashed one."""
    first_verdict_s: float | None = None
    """Deaths only: when the first member declared it dead."""
    bytes_per_member_s: float = 0.0
    """Payload bytes each member sent per second over the run (datagrams and streams)."""
    steady_bytes_per_member_s: float = 0.0
    """The same, measured before the event (a quiet cluster)."""
    packets_per_member_s: float = 0.0
    wall_s: float = 0.0


@dataclass(frozen=True, slots=True)
class FalseDeathResult:
    """False verdicts in a run where nobody failed."""

    members: int
    duration_s: float
    lifeguard: bool
    healthy_verdicts: int
    """"Dead" verdicts (observer, subject) about members other than the slow one."""
    healthy_incidents: int
    """Distinct (subject, incarnation) among them: one false death seen by many is one."""
    slow_verdicts: int
    """Verdicts about the slow member itself."""
    slow_incidents: int
    healthy_suspicions: int
    """Distinct (subject, incarnation) suspicions of healthy members (each forced a refutation)."""
    slow_suspicions: int
    slow_member_health: float
    """The slow member's mean awareness score, sampled every second (0 = healthy)."""
    wall_s: float = 0.0


def _quorum(n: int, fraction: float = 0.99) -> int:
    return max(1, math.ceil(fraction * n))


def measure_join(
    n: int,
    config: GossipConfig,
    seed: int,
    network: NetworkModel | None = None,
    *,
    warmup: float = 2.0,
    timeout: float = 60.0,
) -> SpreadResult:
    """A converged cluster of ``n`` members; after ``warmup`` a new member joins through
    member 0. Counts the original members that record it as joined."""
    started = time.perf_counter()
    sim = Simulator(n, config, seed, network)
    sim.run_until(warmup)
    joiner = sim.add_member()
    joiner_id = joiner.core.id
    t0 = sim.now
    seen: set[int] = set()
    times: dict[str, float] = {}
    need = _quorum(n)

    def watch(observer: int, ev: MemberEvent, now: float) -> None:
        if ev.kind is EventKind.JOINED and ev.member.id == joiner_id and observer != joiner.index:
            seen.add(observer)
            if len(seen) >= need:
                times.setdefault("99", now - t0)
            if len(seen) >= n:
                times.setdefault("all", now - t0)

    sim.watch(watch)
    sim.join(joiner.index, [0])
    sim.run_until(t0 + timeout, stop=lambda: "all" in times)
    return SpreadResult(
        members=n,
        reached_99_s=times.get("99"),
        reached_all_s=times.get("all"),
        wall_s=time.perf_counter() - started,
    )


def measure_death(
    n: int,
    config: GossipConfig,
    seed: int,
    network: NetworkModel | None = None,
    *,
    warmup: float = 10.0,
    timeout: float | None = None,
    victim: int | None = None,
) -> SpreadResult:
    """A converged cluster of ``n`` members; after ``warmup`` one crashes. Counts survivors
    that declare it dead. Bytes are measured from 1 s into the run (after the start-up stagger)
    to the end, and in the quiet window before the crash."""
    started = time.perf_counter()
    sim = Simulator(n, config, seed, network)
    victim = n // 2 if victim is None else victim
    victim_id = sim.members[victim].core.id
    if timeout is None:
        # Far beyond the expected detection time: the worst case is the maximum suspicion
        # timeout (no confirmations) after a full probe round.
        timeout = (
            config.suspicion_max(n) + 4 * config.probe_interval * config.awareness_max_multiplier
        )
    sim.run_until(1.0)
    bytes0, t_bytes0 = sim.bytes_sent(), sim.now
    sim.run_until(warmup)
    t0 = sim.now
    steady = (sim.bytes_sent() - bytes0) / n / (t0 - t_bytes0)
    packets0 = sum(m.packets_sent for m in sim.members)
    sim.kill(victim)
    dead: set[int] = set()
    times: dict[str, float] = {}
    need = _quorum(n - 1)

    def watch(observer: int, ev: MemberEvent, now: float) -> None:
        if ev.member.id != victim_id:
            return
        if ev.kind is EventKind.SUSPECT:
            times.setdefault("suspect", now - t0)
        elif ev.kind is EventKind.DEAD:
            times.setdefault("verdict", now - t0)
            dead.add(observer)
            if len(dead) >= need:
                times.setdefault("99", now - t0)
            if len(dead) >= n - 1:
                times.setdefault("all", now - t0)

    sim.watch(watch)
    sim.run_until(t0 + timeout, stop=lambda: "all" in times)
    elapsed = sim.now - t_bytes0
    packets = sum(m.packets_sent for m in sim.members) - packets0
    return SpreadResult(
        members=n - 1,
        reached_99_s=times.get("99"),
        reached_all_s=times.get("all"),
        first_suspect_s=times.get("suspect"),
        first_verdict_s=times.get("verdict"),
        bytes_per_member_s=(sim.bytes_sent() - bytes0) / n / elapsed,
        steady_bytes_per_member_s=steady,
        packets_per_member_s=packets / n / max(1e-9, sim.now - t0),
        wall_s=time.perf_counter() - started,
    )


def measure_false_deaths(
    n: int,
    config: GossipConfig,
    seed: int,
    *,
    duration: float,
    loss: float = 0.05,
    slow: Slowness | None = None,
    slow_index: int = 1,
) -> FalseDeathResult:
    """``n`` members on a network losing ``loss`` of datagrams, member ``slow_index`` slowed as
    ``slow`` says (default :class:`BusyLoop`), nobody failing, for ``duration`` seconds."""
    started = time.perf_counter()
    slow = slow or BusyLoop()
    sim = Simulator(n, config, seed, NetworkModel(loss=loss))
    slow_id = sim.members[slow_index].core.id
    sim.make_slow(slow_index, slow)
    verdicts = {"healthy": 0, "slow": 0}
    incidents: dict[str, set[tuple[str, int]]] = {"healthy": set(), "slow": set()}
    suspicions: dict[str, set[tuple[str, int]]] = {"healthy": set(), "slow": set()}
    health: list[int] = []

    def watch(observer: int, ev: MemberEvent, now: float) -> None:
        who = "slow" if ev.member.id == slow_id else "healthy"
        key = (ev.member.id, ev.member.incarnation)
        if ev.kind is EventKind.DEAD:
            verdicts[who] += 1
            incidents[who].add(key)
        elif ev.kind is EventKind.SUSPECT:
            suspicions[who].add(key)

    def sample() -> None:
        health.append(sim.members[slow_index].core.health_score)
        if sim.now + 1.0 <= duration:
            sim.at(sim.now + 1.0, sample)

    sim.watch(watch)
    sim.at(1.0, sample)
    sim.run_until(duration)
    return FalseDeathResult(
        members=n,
        duration_s=duration,
        lifeguard=config.lifeguard,
        healthy_verdicts=verdicts["healthy"],
        healthy_incidents=len(incidents["healthy"]),
        slow_verdicts=verdicts["slow"],
        slow_incidents=len(incidents["slow"]),
        healthy_suspicions=len(suspicions["healthy"]),
        slow_suspicions=len(suspicions["slow"]),
        slow_member_health=sum(health) / len(health) if health else 0.0,
        wall_s=time.perf_counter() - started,
    )
