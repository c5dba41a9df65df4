"""The autoscaler as a leader controller (meshgpu/control/autoscaling.py), under trio's mock
clock: synthetic gossip telemetry from several nodes (plus the leader's own counters), a fake
proposer that applies ``ScaleService`` the way the state does (count and time of the change).
Activation from zero by waiting requests, scale-up after the delay, scale back down to zero once
the window has been idle past the down delay, and a restarted node's counter."""

from __future__ import annotations

import math
from typing import Any

import trio

from meshgpu.clock import FakeClock
from meshgpu.config import parse_config
from meshgpu.config.render import to_json
from meshgpu.control.autoscaling import Autoscaling
from meshgpu.mesh.node_meta import service_key
from meshgpu.state import ScaleService, StateMachine, SubmitRun
from meshgpu.state.commands import decode

SERVICE = """\
type: service
port: 8000
commands: [sleep 1000]
replicas: 0..3
scaling:
  metric: rps
  target: 2
  window: 30s
  scale_up_delay: 5s
  scale_down_delay: 20s
"""


class Proposer:
    def __init__(self, sm: StateMachine, clock: FakeClock) -> None:
        self.sm, self.clock = sm, clock
        self.scaled: list[tuple[float, int, str]] = []
        self.fail = 0

    async def propose(self, data: bytes, request_id: bytes | None = None) -> Any:
        cmd = decode(data)
        assert isinstance(cmd, ScaleService)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("no quorum")
        run = self.sm.runs[cmd.run_name]
        # What the state's handler does (the state helper's; not on this branch).
        run.desired_replicas = run.desired_replicas | {cmd.group: cmd.replicas}
        run.last_scaled_at = run.last_scaled_at | {cmd.group: cmd.at}
        self.scaled.append((round(trio.current_time(), 3), cmd.replicas, cmd.reason))


async def test_activation_scale_up_and_back_to_zero(autojump_clock: trio.abc.Clock) -> None:
    clock = FakeClock()
    sm = StateMachine()
    sm.apply_command(
        SubmitRun(
            at=clock.wall(),
            request_id="r",
            run_id="ab" * 16,
            run_name="svc",
            config=to_json(parse_config(SERVICE)),
        )
    )
    run = sm.runs["svc"]
    run.desired_replicas = {"0": 0}
    key = service_key(run.run_id)
    peers: dict[str, dict[str, tuple[int, int]]] = {}
    local: dict[str, tuple[int, int]] = {}
    proposer = Proposer(sm, clock)
    ctl = Autoscaling(sm, proposer, lambda: peers, "me", lambda: local, interval_s=1.0, clock=clock)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ctl.run)
        # The controller looks at whole seconds; the test and its traffic move at half ones
        # (two tasks woken at one instant run in any order).
        await trio.sleep(30.5)
        assert proposer.scaled == []  # no statistics, nothing waiting: kept at zero

        # A request is held on n2: up to max(1, min) = 1 at once.
        peers["n2"] = {key: (0, 1)}
        await trio.sleep(1.0)
        assert [(n, why) for _, n, why in proposer.scaled] == [
            (1, "requests waiting for a replica")
        ]
        t_activated = proposer.scaled[-1][0]

        # 6 req/s across n2, n3 and the leader itself: ceil(6 / 2) = 3, after scale_up_delay.
        async def traffic(seconds: int) -> None:
            n = 0
            for _ in range(seconds):
                await trio.sleep(1.0)
                n += 2
                peers["n2"] = {key: (n, 0)}
                peers["n3"] = {key: (1000 + n, 0)}
                local[run.run_id] = (n, 0)

        nursery.start_soon(traffic, 28)
        await trio.sleep(29)
        # The windowed rate climbs as the window fills (requests in window / window): up in
        # steps, each no sooner than scale_up_delay after the one before.
        ups = [(t, n) for t, n, _ in proposer.scaled[1:]]
        assert [n for _, n in ups] == [2, 3]
        times = [t_activated] + [t for t, _ in ups]
        assert all(b - a >= 5.0 for a, b in zip(times, times[1:], strict=False))

        # n3's agent restarts (its counter starts over): no negative rate, no scale-down.
        peers["n3"] = {key: (4, 0)}
        await trio.sleep(2)
        assert [n for _, n, _ in proposer.scaled] == [1, 2, 3]

        # Idle: back to zero once the window is idle and scale_down_delay has passed.
        await trio.sleep(60)
        # Down as the window empties, each step scale_down_delay after the last change.
        assert [n for _, n, _ in proposer.scaled] == [1, 2, 3, 2, 0]
        times = [t for t, _, _ in proposer.scaled[2:]]
        assert all(b - a >= 20.0 for a, b in zip(times, times[1:], strict=False))
        assert times[-1] >= t_activated + 28.5 + 30  # to zero: the last request out of the window
        nursery.cancel_scope.cancel()


async def test_a_failed_proposal_is_retried_next_round(autojump_clock: trio.abc.Clock) -> None:
    clock = FakeClock()
    sm = StateMachine()
    sm.apply_command(
        SubmitRun(
            at=clock.wall(),
            request_id="r",
            run_id="cd" * 16,
            run_name="svc",
            config=to_json(parse_config(SERVICE)),
        )
    )
    sm.runs["svc"].desired_replicas = {"0": 0}
    proposer = Proposer(sm, clock)
    proposer.fail = 2
    local = {sm.runs["svc"].run_id: (0, 3)}  # held on the leader's own ingress
    ctl = Autoscaling(sm, proposer, dict, "me", lambda: local, interval_s=0.5, clock=clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ctl.run)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert [n for _, n, _ in proposer.scaled] == [1]
    assert math.isclose(proposer.scaled[0][0], 1.0)  # the third round (0, 0.5, 1.0)
