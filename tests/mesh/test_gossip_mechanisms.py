"""Suspicion timeouts, awareness, the broadcast queue and the member table, one by one."""

from __future__ import annotations

import math
import random

import pytest

from meshgpu.mesh.gossip import Alive, Dead, MemberState, Suspect
from meshgpu.mesh.gossip.awareness import Awareness
from meshgpu.mesh.gossip.codec import encode_message
from meshgpu.mesh.gossip.members import Member, MemberTable
from meshgpu.mesh.gossip.queue import BroadcastQueue
from meshgpu.mesh.gossip.suspicion import Suspicion, suspicion_timeout

# ------------------------------------------------------------------ suspicion


@pytest.mark.parametrize(
    ("n", "k", "elapsed", "expected"),
    [
        # memberlist suspicion_test.go TestSuspicion_remainingSuspicionTime (min 2 s, max 30 s)
        (0, 3, 0.0, 30.0),
        (1, 3, 2.0, 14.0),
        (2, 3, 3.0, 4.81),
        (3, 3, 4.0, -2.0),
        (4, 3, 5.0, -3.0),
        (5, 3, 10.0, -8.0),
    ],
)
def test_remaining_time_matches_memberlist(n: int, k: int, elapsed: float, expected: float) -> None:
    assert suspicion_timeout(n, k, 2.0, 30.0) - elapsed == pytest.approx(expected, abs=1e-9)


def test_timeout_formula_shrinks_logarithmically_and_floors_at_min() -> None:
    lo, hi, k = 12.0, 72.0, 2
    values = [suspicion_timeout(n, k, lo, hi) for n in range(5)]
    assert values[0] == hi
    # log(n + 1) / log(k + 1) of the way from max to min, truncated to milliseconds
    assert values[1] == pytest.approx(hi - (hi - lo) * math.log(2) / math.log(3), abs=1e-3)
    assert values[2:] == [lo, lo, lo]
    assert suspicion_timeout(0, 0, lo, hi) == lo  # nobody can confirm: start at the minimum


def test_confirmations_count_once_per_member_and_never_the_accuser() -> None:
    s = Suspicion("accuser", 7, start=100.0, k=3, min_timeout=2.0, max_timeout=30.0)
    assert s.deadline == 130.0
    assert not s.confirm("accuser")
    assert s.confirm("b") and s.deadline == pytest.approx(116.0)
    assert not s.confirm("b")  # duplicate
    assert s.confirm("c") and s.deadline == pytest.approx(107.81)
    assert s.confirm("d") and s.deadline == pytest.approx(102.0)
    assert not s.confirm("e")  # k reached: later confirmations change nothing
    assert s.n == 3


def test_suspicion_without_expected_confirmations_starts_at_min() -> None:
    s = Suspicion("a", 1, start=5.0, k=0, min_timeout=4.0, max_timeout=24.0)
    assert s.deadline == 9.0
    assert not s.confirm("b")


# ------------------------------------------------------------------ awareness


def test_awareness_is_bounded_and_scales_timeouts() -> None:
    a = Awareness(8)
    a.apply_delta(-1)
    assert a.score == 0
    a.apply_delta(3)
    assert a.score == 3 and a.scale(1.0) == 4.0
    a.apply_delta(100)
    assert a.score == 7 and a.scale(0.5) == 4.0
    for _ in range(3):
        a.apply_delta(-1)
    assert a.score == 4
    a.apply_delta(-100)
    assert a.score == 0 and a.scale(1.0) == 1.0


def test_awareness_disabled_stays_healthy() -> None:
    a = Awareness(8, enabled=False)
    a.apply_delta(5)
    assert a.score == 0 and a.scale(2.0) == 2.0


# ------------------------------------------------------------------ broadcast queue


def _queue(q: BroadcastQueue, msg: Alive | Suspect | Dead, **kw: object) -> bytes:
    enc = encode_message(msg)
    q.queue(msg.member, msg, enc, **kw)  # type: ignore[arg-type]
    return enc


def test_each_broadcast_is_sent_exactly_the_retransmit_limit() -> None:
    q = BroadcastQueue()
    _queue(q, Alive("a", 1, ("h", 1)))
    sends = 0
    while q.get(1400, transmit_limit=4):
        sends += 1
    assert sends == 4 and len(q) == 0


def test_newer_broadcast_about_a_member_invalidates_the_older() -> None:
    q = BroadcastQueue()
    done: list[str] = []
    _queue(q, Suspect("a", 1, "b"), on_done=lambda: done.append("suspect"))
    q.get(1400, 10)
    _queue(q, Alive("a", 2, ("h", 1)))
    assert done == ["suspect"]
    assert q.pending() == [(Alive("a", 2, ("h", 1)), 0)]
    _queue(q, Alive("other", 1, ("h", 2)))
    assert len(q) == 2


def test_get_orders_by_transmits_then_size_then_age_and_respects_the_budget() -> None:
    q = BroadcastQueue()
    small = _queue(q, Dead("a", 1, "x"))
    big = _queue(q, Alive("b", 1, ("host", 1), {"k": "v" * 40}))
    newer_small = _queue(q, Dead("c", 1, "x"))
    assert len(small) == len(newer_small)
    first = q.get(1400, 10)
    assert [enc for _, enc in first] == [big, newer_small, small]
    # Everything now has one transmission; a fresh one goes first, then the least sent.
    fresh = _queue(q, Dead("d", 1, "x"))
    budget = len(fresh) + len(big)
    second = q.get(budget, 10)
    assert [enc for _, enc in second] == [fresh, big]
    assert sum(len(enc) for _, enc in second) <= budget
    assert q.get(len(small) - 1, 10) == []  # nothing fits


def test_finished_broadcast_notifies() -> None:
    q = BroadcastQueue()
    done: list[int] = []
    _queue(q, Dead("me", 3, "me"), on_done=lambda: done.append(1))
    q.get(1400, 2)
    assert done == []
    q.get(1400, 2)
    assert done == [1]


# ------------------------------------------------------------------ member table


def _member(i: int, state: MemberState = MemberState.ALIVE) -> Member:
    return Member(f"m{i}", ("h", i), 1, state, 0.0)


def test_round_robin_probes_everyone_once_per_round_in_a_fresh_order() -> None:
    t = MemberTable(random.Random(3))
    for i in range(10):
        t.add(_member(i))
    t.add(_member(10, MemberState.DEAD))
    rounds = []
    for _ in range(3):
        targets = [t.next_probe_target("m0") for _ in range(9)]
        rounds.append([m.id for m in targets if m is not None])
    for r in rounds:
        assert sorted(r) == sorted(f"m{i}" for i in range(1, 10))  # not self, not the dead one
    assert rounds[0] != rounds[1] or rounds[1] != rounds[2]
    assert t.live == 10


def test_k_random_returns_distinct_accepted_members() -> None:
    t = MemberTable(random.Random(1))
    for i in range(50):
        t.add(_member(i, MemberState.ALIVE if i % 2 else MemberState.DEAD))
    picked = t.k_random(3, lambda m: m.state is MemberState.ALIVE)
    assert len(picked) == 3 and len({m.id for m in picked}) == 3
    assert all(m.state is MemberState.ALIVE for m in picked)
    assert len(t.k_random(30, lambda m: m.state is MemberState.ALIVE)) == 25  # exhaustive
    assert t.k_random(3, lambda m: False) == []


def test_removing_and_state_changes_keep_the_live_count() -> None:
    t = MemberTable(random.Random(1))
    members = [_member(i) for i in range(5)]
    for m in members:
        t.add(m)
    t.set_state(members[1], MemberState.SUSPECT, 1.0)
    assert t.live == 5
    t.set_state(members[1], MemberState.DEAD, 2.0)
    assert t.live == 4 and members[1].state_since == 2.0
    t.remove("m1")
    t.remove("m2")
    assert t.live == 3 and len(t) == 3 and t.get("m2") is None
