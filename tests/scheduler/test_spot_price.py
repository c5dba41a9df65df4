"""``spot_policy`` and ``max_price`` against the ``spot``/``price`` labels an agent registers
(``--spot``, ``--price``), each refusal said in why-pending."""

from __future__ import annotations

import pytest

from meshgpu.config.spec import compile_placement
from meshgpu.scheduler.filters import run_filters
from meshgpu.state import JobStatus
from tests.scheduler._world import host, jobs, schedule, submit, task, world

SPOT = {"spot": "true", "price": "0.9"}
ON_DEMAND = {"price": "2.5"}
UNPRICED: dict[str, str] = {}


def where(labels: dict[str, str], **config: object) -> str:
    """Where a one-GPU task with ``config`` goes on one host with ``labels``: "placed", or why
    it waits."""
    sm = world(host("h1", 8, labels=labels), submit("r", task("H100:1", **config)))
    schedule(sm)
    [job] = jobs(sm, "r")
    return "placed" if job.status is not JobStatus.SUBMITTED else job.why_pending


@pytest.mark.parametrize(
    ("labels", "policy", "expected"),
    [
        (SPOT, None, "h1 is a spot instance (spot_policy: on-demand)"),  # dstack's default
        (SPOT, "on-demand", "h1 is a spot instance (spot_policy: on-demand)"),
        (SPOT, "spot", "placed"),
        (SPOT, "auto", "placed"),
        (ON_DEMAND, None, "placed"),
        (ON_DEMAND, "spot", "h1 is not a spot instance (spot_policy: spot)"),
        (ON_DEMAND, "auto", "placed"),
        ({"spot": "false"}, "spot", "h1 is not a spot instance (spot_policy: spot)"),
    ],
)
def test_spot_policy(labels: dict[str, str], policy: str | None, expected: str) -> None:
    config = {"spot_policy": policy} if policy else {}
    out = where(labels, **config)
    assert out == expected if expected == "placed" else expected in out


@pytest.mark.parametrize(
    ("labels", "max_price", "expected"),
    [
        (ON_DEMAND, 3.0, "placed"),
        (ON_DEMAND, 2.5, "placed"),  # at the bound
        (ON_DEMAND, 2.0, "h1 costs $2.5/h, over max_price $2.0"),
        (UNPRICED, 100.0, "h1 has no price: start its agent with --price"),
        ({"price": "cheap"}, 1.0, "h1's price label 'cheap' is not a number"),
        ({"price": "0"}, 0.01, "placed"),  # a free host (--price 0) has a price
        (UNPRICED, None, "placed"),  # without max_price, price does not matter
    ],
)
def test_max_price(labels: dict[str, str], max_price: float | None, expected: str) -> None:
    config = {"max_price": max_price} if max_price is not None else {}
    out = where(labels, **config)
    if expected == "placed":
        assert out == "placed"
    else:
        assert out.startswith("no host can ever run it") and expected in out


def test_spot_and_price_together_say_the_first_refusal() -> None:
    assert "spot instance" in where(SPOT, max_price=0.5)
    assert "over max_price $0.5" in where(SPOT, spot_policy="spot", max_price=0.5)
    assert where(SPOT, spot_policy="auto", max_price=1.0) == "placed"


def test_the_filter_itself() -> None:
    filters = run_filters(compile_placement(task("H100:1", max_price=1.0)))
    unpriced = world(host("h1", 1)).nodes["h1"]
    priced = world(host("h2", 1, labels={"price": "1"})).nodes["h2"]
    assert filters.reject(unpriced) == "h1 has no price: start its agent with --price"
    assert filters.reject(priced) == ""
