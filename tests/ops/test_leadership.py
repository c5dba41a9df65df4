"""Leadership is a scope: controllers run while this node leads, in a nursery per term, and are
cancelled at step-down (nothing polls the role)."""

from __future__ import annotations

import trio
import trio.testing

from consensus.core import Role
from meshgpu.replica import Leadership, election_window_s
from meshgpu.replica.leadership import Controller


class FakeNode:
    def __init__(self) -> None:
        self.role, self.term, self.leader = Role.FOLLOWER, 1, 0
        self._changed = trio.Event()

    def lead(self, role: Role, term: int, leader: int) -> None:
        self.role, self.term, self.leader = role, term, leader
        self._changed.set()
        self._changed = trio.Event()

    async def leader_changed(self) -> None:
        await self._changed.wait()


async def test_controllers_run_per_term_and_stop_at_step_down() -> None:
    node = FakeNode()
    log: list[str] = []

    def controller(name: str) -> Controller:
        async def run() -> None:
            log.append(f"start {name} term={node.term}")
            try:
                await trio.sleep_forever()
            finally:
                log.append(f"stop {name}")

        return run

    leadership = Leadership(node, [("a", controller("a")), ("b", controller("b"))])  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(leadership.run)
        await trio.testing.wait_all_tasks_blocked()
        assert log == [] and leadership.term is None
        node.lead(Role.LEADER, 2, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(log) == ["start a term=2", "start b term=2"] and leadership.term == 2
        node.lead(Role.FOLLOWER, 3, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(log[2:]) == ["stop a", "stop b"] and leadership.term is None
        node.lead(Role.LEADER, 4, 1)  # a new term: fresh controllers
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(log[4:]) == ["start a term=4", "start b term=4"]
        nursery.cancel_scope.cancel()


def test_the_election_window_is_the_longest_election_timeout() -> None:
    from consensus.node import NodeOptions

    assert election_window_s(NodeOptions(tick_s=0.1, election_tick=10)) == 2.0
