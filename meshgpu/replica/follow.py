"""Following the replicated state: the Raft owner task only publishes "applied up to N"
(``RaftNode.wait_applied(after=)``); whatever reacts to applied entries -- the executor, the
scheduler's demand, the member list on disk and the CA key -- waits for that in a task of its
own, so the owner task never runs their work (file writes, unsealing, network calls) and a slow
reaction never delays a heartbeat. A follower reads the state when woken: it sees everything
applied so far, however many entries that was."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from consensus.node import RaftNode


async def follow_applied(node: RaftNode, react: Callable[[int], object]) -> None:
    """``react(applied index)`` after every batch of applied entries (whatever is applied
    already counts as news). ``react`` runs in this task: it must not block."""
    index = 0
    while True:
        index = await node.wait_applied(after=index)
        react(index)


async def follow_version(
    node: RaftNode,
    version: Callable[[], int],
    react: Callable[[], Awaitable[None]],
    seen: int = -1,
) -> None:
    """``await react()`` whenever ``version()`` differs from what it was at the last reaction
    (``seen`` at first), checked after applied entries. Entries applied while ``react`` runs
    are looked at once it returns: a change is never missed, and reactions never overlap."""
    index = 0
    while True:
        index = await node.wait_applied(after=index)
        now = version()
        if now != seen:
            seen = now
            await react()
