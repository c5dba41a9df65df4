"""Leadership is a scope, not a check (Nomad's establishLeadership/revokeLeadership): the
leader's duties are controllers, started in a nursery when this node becomes leader and
cancelled when it steps down. A controller is an async function that runs until cancelled; it
never asks whether this node leads -- while it runs, it does, in the term it was started for.
Later duties (autoscaler, provisioner, key rotation) plug in as one more entry of the list."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import trio

from consensus.core import Role

if TYPE_CHECKING:
    from consensus.node import NodeOptions, RaftNode

log = logging.getLogger(__name__)

Controller = Callable[[], Awaitable[None]]


def election_window_s(options: NodeOptions) -> float:
    """The longest an election timeout lasts (randomized in ``[1, 2) x election_tick`` ticks):
    past it, a silent leader or peer is gone, not slow. The one place it is computed."""
    return 2 * options.tick_s * options.election_tick


class Leadership:
    """Runs ``controllers`` (name, factory) while ``node`` leads: each term of leadership gets
    fresh controller tasks in a nursery of its own, cancelled on step-down."""

    def __init__(self, node: RaftNode, controllers: Sequence[tuple[str, Controller]]) -> None:
        self.node = node
        self.controllers = list(controllers)
        self.term: int | None = None  # the term being led now, None while following

    async def run(self) -> None:
        node = self.node
        while True:
            if node.role is not Role.LEADER:
                await node.leader_changed()
                continue
            self.term = node.term
            log.info("leading term %d: starting %d controller(s)", node.term, len(self.controllers))
            try:
                async with trio.open_nursery() as nursery:
                    for name, controller in self.controllers:
                        nursery.start_soon(controller, name=f"controller:{name}")
                    while node.role is Role.LEADER:
                        await node.leader_changed()
                    nursery.cancel_scope.cancel()
            finally:
                self.term = None
            log.info("stepped down: leader controllers stopped")
