"""The Raft node over the replicated state, with its transport on the peer port."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from consensus.node import NodeOptions, RaftNode, bootstrap_storage
from consensus.storage import DiskStorage
from consensus.transport import TLSConfig, Transport, parse_address

if TYPE_CHECKING:
    from meshgpu.host.identity import HostIdentity
    from meshgpu.state.cluster import Replicated

log = logging.getLogger(__name__)


def open_replica(
    identity: HostIdentity, replicated: Replicated, *, tick_s: float, min_free: int
) -> RaftNode:
    """The Raft node over ``replicated``, its log opened (a founder's bootstrapped), not yet
    running: the parts that react to applied entries attach to ``on_apply`` before it starts."""
    s = identity.settings
    rid = identity.raft_id
    raft_dir = str(s.data_dir / "raft")
    storage = bootstrap_storage(raft_dir, [rid]) if rid == 1 else DiskStorage(raft_dir)
    peers = {int(k): v for k, v in (identity.data.get("peers") or {}).items()}
    return RaftNode(
        rid,
        storage,
        replicated,
        peers=peers,
        options=NodeOptions(tick_s=tick_s, min_free_bytes=min_free),
    )


async def start_replica(
    nursery: trio.Nursery,
    node: RaftNode,
    identity: HostIdentity,
    on_request: Callable[[int, bytes], Awaitable[bytes]],
) -> Transport:
    """Start the transport (peer port: Raft, and ``on_request`` for the app streams that
    share it) and the node, under ``nursery``. A lone voter campaigns at once."""
    s = identity.settings
    rid = node.id
    peers = {int(k): v for k, v in (identity.data.get("peers") or {}).items()}

    async def deliver(msgs: list[Any]) -> None:
        for m in msgs:
            node.deliver(m)

    transport = Transport(
        rid,
        on_messages=deliver,
        on_unreachable=node.report_unreachable,
        on_snapshot_status=node.report_snapshot,
        on_request=on_request,
        peers={k: parse_address(v) for k, v in peers.items() if k != rid and v},
        tls=TLSConfig.from_files(identity.tls.files),
        host=s.bind,
        port=s.peer_port,
    )
    await nursery.start(transport.run)
    if s.peer_port == 0:  # bound to a free port: advertise the real one
        identity.bound_peer_port(transport.port)
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
