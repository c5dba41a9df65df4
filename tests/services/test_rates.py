"""Every node's view of its services' request rates (ps, run views), from the members' counters
in gossip and its own; and what the views and the CLI make of a service."""

from __future__ import annotations

from typing import Any

from meshgpu.api.views import run_summary, run_view
from meshgpu.cli._runs import service_lines
from meshgpu.mesh.node_meta import service_key
from meshgpu.services.rates import ServiceRates
from tests.services._harness import mesh, place, submit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def wall(self) -> float:
        return self.now


def test_rates_sum_every_node_over_the_window() -> None:
    state = mesh()
    submit(state, "svc", 8000, model="m1")
    run = state.runs["svc"]
    key = service_key(run.run_id)
    gossip: dict[str, Any] = {"n2": {key: (100, 0)}, "n3": {}}
    local = {run.run_id: (50, 0)}
    clock = Clock()
    rates = ServiceRates(state, lambda: gossip, "n1", lambda: local, "ai.example", clock=clock)  # type: ignore[arg-type]
    assert rates.rps(run) is None  # not measured yet
    rates.sample()
    assert rates.rps(run) is None  # one sample: no rate
    for _ in range(60):  # a minute: n2 serves 2 req/s, this node 1 req/s
        clock.now += 1
        gossip["n2"] = {key: (gossip["n2"][key][0] + 2, 0)}
        local[run.run_id] = (local[run.run_id][0] + 1, 0)
        rates.sample()
    assert abs(rates.rps(run) - 3.0) < 0.01  # type: ignore[operator]
    # a restarted node's counter goes down: counted as a reset, not a negative rate
    gossip["n2"] = {key: (5, 0)}
    clock.now += 1
    rates.sample()
    assert rates.rps(run) > 0  # type: ignore[operator]
    view = run_summary(run, state, rates)["service"]
    assert view["rps"] is not None and view["url"] == "https://svc.ai.example/"
    assert view["path"] == "/proxy/services/main/svc/"
    assert view["model_base_path"] == "/proxy/models/main/"


def test_apply_prints_where_a_service_answers() -> None:
    state = mesh()
    submit(state, "svc", 8000, model="m1")
    place(state, "svc", ["n1"])
    view = run_view(state.runs["svc"], state)
    lines = service_lines(view, "https://10.0.0.1:7480/")
    assert lines[0] == "service URL: https://10.0.0.1:7480/proxy/services/main/svc/"
    assert "model m1: OpenAI base URL https://10.0.0.1:7480/proxy/models/main/" in lines
    task = {"service": None}
    assert service_lines(task, "https://x") == []
