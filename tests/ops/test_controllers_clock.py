"""Leader controllers and the replica's followers under a fake clock (trio's MockClock,
autojump; ``meshgpu.clock.FakeClock`` moves wall time with it): retention over a day of wall
time with its production interval, in milliseconds; a follower of the applied index that never
misses a change and never runs twice at once."""

from __future__ import annotations

import trio
import trio.testing

from meshgpu.clock import FakeClock
from meshgpu.control import Retention
from meshgpu.control.retention import INTERVAL_S
from meshgpu.replica import follow_applied, follow_version
from meshgpu.state import PruneRuns, StateMachine, decode
from meshgpu.state.cluster import Replicated
from tests.api._stub import Proposer
from tests.state.test_state import apply, finish, node, schedule, start_all, submit, task

DAY = 86400.0
EPOCH = 1_000.0  # wall time when the mock clock reads 0


async def test_the_retention_controller_prunes_a_day_after_a_run_finished(
    autojump_clock: trio.abc.Clock,
) -> None:
    sm = StateMachine()
    apply(sm, node("n1", 8), *(submit(f"r{i}", task("H100:1"), at=1.0) for i in range(3)))
    schedule(sm)
    start_all(sm)
    finish(sm, "r0", at=EPOCH)  # finished "now"
    replicated = Replicated()
    replicated.jobs = sm
    proposer = Proposer(replicated)
    retention = Retention(sm, proposer, keep_runs=1000, keep_for_s=DAY, clock=FakeClock(EPOCH))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(retention.run)
        # Half an interval off the controller's looks (every INTERVAL_S from 0): a test that
        # wakes at the same instant as the controller would race it.
        await trio.sleep(DAY - INTERVAL_S / 2)
        assert proposer.proposed == [] and "r0" in sm.runs  # not a day old yet
        await trio.sleep(2 * INTERVAL_S)  # the first look past the day prunes
        assert [type(decode(c)) for c in proposer.proposed] == [PruneRuns]
        assert set(sm.runs) == {"r1", "r2"}  # the active ones stay
        await trio.sleep(10 * INTERVAL_S)
        assert len(proposer.proposed) == 1  # nothing more to prune: nothing proposed
        nursery.cancel_scope.cancel()


class _Node:
    """A Raft node as its followers see it: how far it applied, and a way to wait for more."""

    def __init__(self) -> None:
        self.applied = 0
        self._moved = trio.Event()

    def advance(self) -> None:
        self.applied += 1
        self._moved.set()
        self._moved = trio.Event()

    async def wait_applied(self, index: int = 0, *, after: int | None = None) -> int:
        target = index if after is None else after + 1
        while self.applied < target:
            await self._moved.wait()
        return self.applied


async def test_a_follower_sees_every_change_and_never_overlaps(
    autojump_clock: trio.abc.Clock,
) -> None:
    node = _Node()
    version = [0]
    seen: list[int] = []
    running = [0]
    woken: list[int] = []

    async def react() -> None:  # slow: a file written in a worker thread, say
        running[0] += 1
        assert running[0] == 1
        seen.append(version[0])  # what it reads of the state
        await trio.sleep(1.0)
        running[0] -= 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow_version, node, lambda: version[0], react, 0)
        nursery.start_soon(follow_applied, node, woken.append)
        node.advance()  # an entry that changes nothing followed
        await trio.sleep(0.1)
        assert seen == [] and woken == [1]
        version[0] = 1
        node.advance()
        await trio.sleep(0.5)  # while it reacts, two more changes land
        version[0] = 2
        node.advance()
        version[0] = 3
        node.advance()
        await trio.sleep(5.0)
        assert seen == [1, 3]  # then the latest state, once it had finished with the first
        assert woken[-1] == 4
        nursery.cancel_scope.cancel()
