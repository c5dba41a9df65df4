"""Self-fencing under a fake clock (trio's MockClock, autojump): a host that hears no leader for
the fencing period stops its jobs, and only then; one that keeps hearing it never does. The
periods are the production ones (30 s grace, 60 %): the test takes milliseconds."""

from __future__ import annotations

from types import SimpleNamespace

import trio

from consensus.core import Role
from meshgpu.clock import FakeClock
from meshgpu.host.fencing import Fencing
from meshgpu.mesh.membership import MembershipPolicy

POLICY = MembershipPolicy()
FENCE_S = POLICY.dead_grace_s * POLICY.fence_fraction  # 18 s


class _Jobs:
    def __init__(self) -> None:
        self.local = {"job-1": 1}
        self.fenced_at: list[float] = []

    def fence(self) -> None:
        self.fenced_at.append(trio.current_time())
        self.local.clear()


def _follower() -> SimpleNamespace:
    return SimpleNamespace(
        id=2,
        leader=1,
        role=Role.FOLLOWER,
        last_heard={1: trio.current_time()},
        options=SimpleNamespace(tick_s=0.1, election_tick=10),
        status=lambda: {"voters": [1, 2, 3]},
    )


async def test_a_host_cut_off_from_the_leader_fences_its_jobs_after_the_period(
    autojump_clock: trio.abc.Clock,
) -> None:
    node, jobs = _follower(), _Jobs()
    fence = Fencing(node, jobs, FENCE_S, clock=FakeClock())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fence.run)
        await trio.sleep(FENCE_S)  # the leader went silent at 0; contact counts for 2 s more
        assert not jobs.fenced_at and not fence.cut_off
        await trio.sleep(3.0)
        assert fence.cut_off and len(jobs.fenced_at) == 1
        assert FENCE_S + 1.5 < jobs.fenced_at[0] <= FENCE_S + 2.5
        # The leader is heard again: no longer cut off.
        node.last_heard[1] = trio.current_time()
        await trio.sleep(1.0)
        assert not fence.cut_off
        nursery.cancel_scope.cancel()


async def test_a_host_that_hears_its_leader_never_fences(autojump_clock: trio.abc.Clock) -> None:
    node, jobs = _follower(), _Jobs()
    fence = Fencing(node, jobs, FENCE_S, clock=FakeClock())

    async def leader_heartbeats() -> None:
        while True:
            node.last_heard[1] = trio.current_time()
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leader_heartbeats)
        nursery.start_soon(fence.run)
        await trio.sleep(10 * FENCE_S)
        assert not jobs.fenced_at and not fence.cut_off
        # An election (no leader for a second or two) changes nothing either.
        node.leader = 0
        await trio.sleep(2.0)
        assert not jobs.fenced_at and not fence.cut_off
        nursery.cancel_scope.cancel()
