"""The RPS autoscaler's pure rule (meshgpu/services/autoscaler.py): dstack's formula
desired = ceil(rps over window / target) clipped to [min, max], the up/down delays, scale-up
from zero at once, activation by held requests, no statistics => keep; and the request history
built from per-node cumulative counters (a counter that went down is a restarted agent)."""

from __future__ import annotations

import pytest

from meshgpu.config.spec import Scaling
from meshgpu.services.autoscaler import Rate, RateHistory, desired_replicas

S = Scaling(target=10.0, window_s=60, scale_up_delay_s=300.0, scale_down_delay_s=600.0)
FULL = True


@pytest.mark.parametrize(
    ("low", "high", "current", "since", "rps", "full", "waiting", "expected"),
    [
        # the formula: ceil(rps / target), clipped
        (1, 5, 1, 1000, 25.0, FULL, False, 3),
        (1, 5, 3, 1000, 30.0, FULL, False, 3),  # exactly 3 replicas' worth: 3
        (1, 5, 3, 1000, 30.1, FULL, False, 4),
        (1, 5, 1, 1000, 500.0, FULL, False, 5),  # clipped to max
        (2, 5, 3, 1000, 0.0, FULL, False, 2),  # clipped to min
        (0, 5, 2, 1000, 0.0, FULL, False, 0),  # to zero when idle
        # delays since the last change
        (1, 5, 1, 299, 25.0, FULL, False, 1),  # up: not before scale_up_delay
        (1, 5, 1, 300, 25.0, FULL, False, 3),
        (1, 5, 4, 599, 5.0, FULL, False, 4),  # down: not before scale_down_delay
        (1, 5, 4, 600, 5.0, FULL, False, 1),
        # from zero: up at once, whatever the delay
        (0, 5, 0, 0, 0.5, FULL, False, 1),
        (0, 5, 0, 0, 25.0, FULL, False, 3),
        # held requests bring a group at zero up to max(1, min) at once, stats or not
        (0, 5, 0, 0, None, FULL, True, 1),
        (2, 5, 0, 0, None, FULL, True, 2),
        (0, 5, 0, 0, 0.0, FULL, True, 1),
        (0, 5, 2, 0, None, FULL, True, 2),  # not at zero: waiting changes nothing
        # no statistics: keep
        (0, 5, 3, 10_000, None, FULL, False, 3),
        # a window not seen in full: up yes, down no
        (1, 5, 1, 1000, 25.0, False, False, 3),
        (1, 5, 4, 1000, 5.0, False, False, 4),
    ],
)
def test_dstack_rule(
    low: int,
    high: int,
    current: int,
    since: float,
    rps: float | None,
    full: bool,
    waiting: bool,
    expected: int,
) -> None:
    rate = None if rps is None else Rate(rps, full)
    got = desired_replicas(
        scaling=S,
        low=low,
        high=high,
        current=current,
        since_scaled_s=since,
        rate=rate,
        waiting=waiting,
    )
    assert got == expected


def test_no_scaling_keeps_the_count() -> None:
    rate = Rate(1000.0, True)
    assert (
        desired_replicas(
            scaling=None, low=0, high=5, current=2, since_scaled_s=1e9, rate=rate, waiting=True
        )
        == 2
    )


def test_history_rate_over_the_window() -> None:
    h = RateHistory(keep_s=60)
    assert h.rate(0.0, 60) is None  # no statistics
    h.observe(0.0, {"a": 100, "b": 7})  # baselines: nothing counted yet
    assert h.rate(0.0, 60) is None
    for t in range(1, 61):
        h.observe(float(t), {"a": 100 + 2 * t, "b": 7 + t})  # 3 requests a second in all
    r = h.rate(60.0, 60)
    assert r == Rate(3.0, True)
    # Half the window seen: a lower bound, marked partial.
    short = RateHistory(keep_s=60)
    short.observe(0.0, {"a": 0})
    short.observe(30.0, {"a": 90})
    assert short.rate(30.0, 60) == Rate(1.5, False)


def test_history_counter_reset_and_missing_nodes() -> None:
    h = RateHistory(keep_s=10)
    h.observe(0.0, {"a": 1000, "b": 50})
    h.observe(1.0, {"a": 1010, "b": 60})  # +20
    h.observe(2.0, {"a": 4, "b": 70})  # a restarted: its 4 new requests count, +14
    h.observe(3.0, {"b": 75})  # a not heard from: +5
    h.observe(4.0, {"a": 6, "b": 75})  # a back with its restarted counter: +2
    h.observe(5.0, {"c": 1_000_000, "a": 6, "b": 75})  # c first seen: a baseline, +0
    assert h.total == 41
    assert h.rate(5.0, 5) == Rate(41 / 5, True)


def test_history_keeps_only_the_window() -> None:
    h = RateHistory(keep_s=10)
    for t in range(100):
        h.observe(float(t), {"a": t})
    assert len(h.samples) <= 12
    assert h.rate(99.0, 10) == Rate(1.0, True)
