"""Raft messages between processes: msgpack frames over TCP with mutual TLS.

- ``codec``: the frame format and the encoding of core values (strict, versioned, bounded).
- ``tls``: cluster CA, node certificates (``CN=node-<id>``), mTLS contexts, peer identity.
- ``tcp``: ``Transport``, one per node: listener, per-peer bounded queues and senders,
  reconnect with backoff, snapshots on their own connections.

Typical use by a node runtime::

    transport = Transport(
        node_id,
        on_messages=inbox_send.send,             # bounded channel of list[Message]
        on_unreachable=report_unreachable,       # -> RawNode.report_unreachable
        on_snapshot_status=report_snapshot,      # -> RawNode.report_snapshot
        peers={2: ("10.0.0.2", 7001), 3: ("10.0.0.3", 7001)},
        tls=TLSConfig.from_files(files),
        host="0.0.0.0", port=7001,
    )
    port = await nursery.start(transport.run)   # returns once listening
    ...
    transport.send_batch(ready.messages)         # after the fsync that covers them
    transport.set_peer_address(4, "10.0.0.4:7001")   # membership changes
    transport.close()                            # or cancel the nursery

``on_messages`` may also be a plain function (it is awaited only if it returns an awaitable),
and ``send`` is an alias of ``send_batch``.
"""

from .app_stream import AppStream
from .codec import FrameType, StreamKind
from .config import TransportConfig
from .errors import FrameError, PeerIdentityError, TransportError
from .tcp import PeerState, Transport, TransportStats, parse_address
from .tls import (
    CertifiedKey,
    ClusterCA,
    NodeTLSFiles,
    TLSConfig,
    client_context,
    node_id_from_name,
    node_name,
    peer_node_id,
    server_context,
    write_node_files,
)

__all__ = [
    "AppStream",
    "CertifiedKey",
    "ClusterCA",
    "FrameError",
    "FrameType",
    "NodeTLSFiles",
    "PeerIdentityError",
    "PeerState",
    "StreamKind",
    "TLSConfig",
    "Transport",
    "TransportConfig",
    "TransportError",
    "TransportStats",
    "client_context",
    "node_id_from_name",
    "node_name",
    "parse_address",
    "peer_node_id",
    "server_context",
    "write_node_files",
]
