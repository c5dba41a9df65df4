"""The Raft node over the replicated state, with its transport on the peer port."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from consensus.node import NodeOptions, RaftNode, bootstrap_storage
from consensus.storage import DiskStorage
from consensus.transport import AppStream, TLSConfig, Transport, parse_address

if TYPE_CHECKING:
    from meshgpu.state.cluster import Replicated

log = logging.getLogger(__name__)


def open_replica(
    raft_id: int,
    raft_dir: str,
    peers: dict[int, str],
    replicated: Replicated,
    *,
    tick_s: float,
    min_free: int,
) -> RaftNode:
    """The Raft node over ``replicated``, its log opened (a founder's bootstrapped), not yet
    running. What reacts to applied entries follows them in tasks of its own
    (``meshgpu/replica/follow.py``)."""
    storage = bootstrap_storage(raft_dir, [raft_id]) if raft_id == 1 else DiskStorage(raft_dir)
    return RaftNode(
        raft_id,
        storage,
        replicated,
        peers=peers,
        options=NodeOptions(tick_s=tick_s, min_free_bytes=min_free),
    )


async def start_replica(
    nursery: trio.Nursery,
    node: RaftNode,
    peers: dict[int, str],
    tls: TLSConfig,
    bind: str,
    port: int,
    on_stream: Callable[[int, AppStream], Awaitable[None]],
) -> Transport:
    """Start the transport on the peer port (Raft, and ``on_stream`` for the app streams that
    share it: gossip and the peer calls; ``port`` 0: any free one, ``transport.port`` says
    which) and the node, under ``nursery``. A lone voter campaigns at once."""
    rid = node.id

    async def deliver(msgs: list[Any]) -> None:
        for m in msgs:
            node.deliver(m)

    transport = Transport(
        rid,
        on_messages=deliver,
        on_unreachable=node.report_unreachable,
        on_snapshot_status=node.report_snapshot,
        on_stream=on_stream,
        peers={k: parse_address(v) for k, v in peers.items() if k != rid and v},
        tls=tls,
        host=bind,
        port=port,
    )
    await nursery.start(transport.run)
    node.attach(transport)
    await nursery.start(node.run)
    if node.status()["voters"] == [rid]:
        node.campaign()  # alone: no one to wait for
    return transport


async def wait_leader(node: RaftNode) -> None:
    """Until a leader is known. A restart that cannot reach a quorum (peers down, a
    partition) keeps waiting -- it is not an error, and the API answers meanwhile -- and
    says so, less and less often."""
    start = trio.current_time()
    say_at = start + 5.0
    while node.leader == 0:
        with trio.move_on_at(say_at):
            await node.leader_changed()
        now = trio.current_time()
        if node.leader == 0 and now >= say_at:
            st = node.status()
            peers = ", ".join(f"{k}={v}" for k, v in sorted(node.addresses.items()) if k != node.id)
            log.warning(
                "no leader after %.0fs: waiting for a quorum of voters %s to answer "
                "(peers: %s); still trying",
                now - start,
                st["voters"],
                peers or "none known",
            )
            say_at = now + min(60.0, 2 * (say_at - start))
