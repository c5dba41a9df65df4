"""Whole clusters of gossip cores in the simulator: convergence, detection, Lifeguard's effect.

Every run checks the simulator's invariants on every event (incarnations never invented or
going back, nobody suspecting itself); each test uses fixed seeds, so it is deterministic.
"""

from __future__ import annotations

import dataclasses

import pytest

from meshgpu.mesh.gossip import EventKind, GossipConfig, MemberEvent, MemberState
from meshgpu.mesh.gossip.members import MemberInfo
from meshgpu.mesh.gossip.sim import (
    BusyLoop,
    NetworkModel,
    SimInvariantError,
    Simulator,
    Stalls,
    measure_death,
    measure_false_deaths,
    measure_join,
)

LAN = GossipConfig.lan()
LOCAL = GossipConfig.local()


def views(sim: Simulator, subject: int) -> list[MemberState | None]:
    """How every other running member sees ``subject``."""
    sid = sim.members[subject].core.id
    out = []
    for m in sim.members:
        if m.index != subject and m.alive:
            info = m.core.member(sid)
            out.append(info.state if info is not None else None)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_join_reaches_everyone(seed: int) -> None:
    n = 30
    r = measure_join(n, LAN, seed)
    assert r.reached_all_s is not None
    # An epidemic over gossip_nodes per gossip_interval: a handful of rounds, well under a second.
    assert r.reached_all_s <= 10 * LAN.gossip_interval


def test_a_cluster_forms_from_members_that_start_alone() -> None:
    n = 20
    sim = Simulator(n, LAN, seed=3, converged=False)
    for i in range(1, n):
        sim.at(0.1 * i, lambda i=i: sim.join(i, [0]))  # type: ignore[misc]
    sim.run_until(20.0)
    for m in sim.members:
        assert m.core.live_count() == n
        assert all(info.state is MemberState.ALIVE for info in m.core.members())


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_a_killed_member_is_declared_dead_by_all_within_the_config_bound(seed: int) -> None:
    n = 30
    r = measure_death(n, LAN, seed, warmup=3.0)
    # Some member probes the victim within a few probe intervals (each probes everyone once per
    # round); the probe takes one interval to fail; with N = 30 the k = 2 confirmations arrive
    # before the minimum suspicion timeout, so the accuser's timer runs exactly that minimum;
    # then the verdict spreads in a few gossip rounds.
    bound = 5 * LAN.probe_interval + LAN.probe_interval + LAN.suspicion_min(n)
    bound += 10 * LAN.gossip_interval
    assert r.reached_all_s is not None and r.reached_all_s <= bound
    assert r.first_suspect_s is not None and r.first_verdict_s is not None
    assert r.first_verdict_s - r.first_suspect_s == pytest.approx(LAN.suspicion_min(n), abs=0.01)


def test_only_the_killed_member_dies_and_everyone_agrees() -> None:
    n = 25
    sim = Simulator(n, LAN, seed=11)
    deaths: list[tuple[int, str]] = []
    sim.watch(lambda o, ev, now: ev.kind is EventKind.DEAD and deaths.append((o, ev.member.id)))  # type: ignore[func-returns-value]
    sim.run_until(2.0)
    sim.kill(7)
    sim.run_until(30.0)
    victim = sim.members[7].core.id
    assert sorted(o for o, _ in deaths) == [i for i in range(n) if i != 7]
    assert {who for _, who in deaths} == {victim}
    assert views(sim, 7) == [MemberState.DEAD] * (n - 1)


def test_a_leave_propagates_as_left_not_dead() -> None:
    n = 30
    sim = Simulator(n, LAN, seed=5)
    seen: list[EventKind] = []
    leaver = sim.members[5].core.id
    sim.watch(lambda o, ev, now: ev.member.id == leaver and seen.append(ev.kind))  # type: ignore[func-returns-value]
    sim.run_until(2.0)
    sim.leave(5)
    sim.run_until(6.0, stop=lambda: sim.members[5].core.leave_done)
    assert sim.members[5].core.leave_done and not sim.members[5].alive  # it stopped
    sim.run_until(60.0)
    assert views(sim, 5) == [MemberState.LEFT] * (n - 1)
    assert seen.count(EventKind.LEFT) == n  # every member, the leaver included
    assert EventKind.DEAD not in seen


def test_a_metadata_update_reaches_everyone() -> None:
    n = 30
    sim = Simulator(n, LAN, seed=8)
    sim.run_until(2.0)
    core = sim.members[3].core
    new_meta = {**core.member(core.id).meta, "health": "degraded", "free": 2}  # type: ignore[union-attr]
    updates: dict[int, MemberInfo] = {}

    def watch(observer: int, ev: MemberEvent, now: float) -> None:
        if ev.kind is EventKind.UPDATED and ev.member.id == core.id:
            updates[observer] = ev.member

    sim.watch(watch)
    core.update_meta(new_meta)
    sim.run_until(3.0)
    assert set(updates) == set(range(n))
    assert all(
        info.meta == new_meta and info.incarnation == core.incarnation for info in updates.values()
    )


def test_lifeguard_reduces_false_deaths_caused_by_a_slow_member() -> None:
    # 5% loss and one member whose event loop reads one packet per ~0.2 s pass: it reads acks
    # too late and accuses healthy members. With Lifeguard its accusations wait for
    # confirmations that never come and its own health score slows it down.
    totals = {}
    for lifeguard in (True, False):
        cfg = LAN.replace(lifeguard=lifeguard)
        results = [
            measure_false_deaths(30, cfg, seed, duration=120.0, slow=BusyLoop(0.2))
            for seed in range(4)
        ]
        totals[lifeguard] = sum(r.healthy_verdicts for r in results)
        if lifeguard:
            assert max(r.slow_member_health for r in results) > 1.0  # awareness did react
    assert totals[False] >= 50
    assert totals[True] * 10 <= totals[False]


def test_a_stalling_member_never_gets_healthy_members_declared_dead() -> None:
    r = measure_false_deaths(40, LAN, 2, duration=90.0, slow=Stalls(stall_mean=2.0, run_mean=2.0))
    assert r.healthy_verdicts == 0
    assert r.slow_suspicions > 0  # the stalls were real: others suspected the staller


@pytest.mark.parametrize("reconnect", [True, False])
def test_a_healed_partition_rejoins_only_through_reconnects(reconnect: bool) -> None:
    # metallb#589: after a partition long enough for both sides to declare each other dead
    # (and to stop gossiping to the dead), memberlist alone stays split; Serf's reconnects heal.
    # Push/pull stays on: it only ever picks members it considers alive, so it cannot cross.
    n = 16
    cfg = LOCAL.replace(reconnect_interval=5.0 if reconnect else 0.0)
    sim = Simulator(n, cfg, seed=4)
    sim.run_until(1.0)
    sim.partition(list(range(n // 2)), list(range(n // 2, n)))
    sim.run_until(40.0)
    assert views(sim, 0).count(MemberState.DEAD) == n // 2
    sim.heal()
    sim.run_until(100.0)
    alive = [v == MemberState.ALIVE for i in range(n) for v in views(sim, i)]
    if reconnect:
        assert all(alive)
    else:
        assert sum(alive) == 2 * (n // 2) * (n // 2 - 1)  # each half sees only itself


def test_a_restarted_member_rejoins_as_itself_despite_a_low_incarnation() -> None:
    # memberlist#311: it was declared dead at incarnation 6 and restarts at 1; the join's
    # push/pull tells it about the verdict and it outbids it.
    n = 20
    sim = Simulator(n, LAN, seed=9)
    core = sim.members[4].core
    for i in range(5):
        core.update_meta({"gen": i})
    sim.run_until(3.0)
    sim.kill(4)
    sim.run_until(25.0)
    assert views(sim, 4) == [MemberState.DEAD] * (n - 1)
    restarted = sim.restart(4, incarnation=0)
    assert restarted.core.incarnation == 1
    sim.join(4, [0])
    sim.run_until(30.0)
    assert views(sim, 4) == [MemberState.ALIVE] * (n - 1)
    assert restarted.core.incarnation > 6


def test_the_same_seed_reproduces_a_run_exactly() -> None:
    def run() -> tuple[object, ...]:
        r = measure_false_deaths(20, LAN, 7, duration=40.0, slow=BusyLoop(0.2))
        return dataclasses.astuple(dataclasses.replace(r, wall_s=0.0))

    assert run() == run()
    a = measure_death(20, LAN, 3, NetworkModel(loss=0.02), warmup=2.0)
    b = measure_death(20, LAN, 3, NetworkModel(loss=0.02), warmup=2.0)
    assert dataclasses.replace(a, wall_s=0.0) == dataclasses.replace(b, wall_s=0.0)


def test_the_invariant_checker_catches_an_invented_incarnation() -> None:
    sim = Simulator(3, LAN, seed=1)
    info = sim.members[1].core.member(sim.members[1].core.id)
    assert info is not None
    forged = MemberEvent(EventKind.UPDATED, dataclasses.replace(info, incarnation=99))
    with pytest.raises(SimInvariantError):
        sim._check(sim.members[0], forged)
