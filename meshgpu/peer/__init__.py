"""Node-to-node calls over the mutual-TLS peer port (the transport's ``APP`` streams): code
transfer, log and metric proxying, join forwarding. ``wire``: the frames; ``server``: the
callee, one ``on_stream`` shared with gossip; ``client``: ``PeerClient``. Refusals are
``meshgpu.errors`` on both ends. What a host answers is built from the use cases
(``meshgpu.ops.peers.answers``), which in turn are given a ``PeerClient`` as their ``Peers``."""

from .client import PeerClient, PeerCodeLink, members_of
from .server import PeerHandlers, PeerServer

__all__ = ["PeerClient", "PeerCodeLink", "PeerHandlers", "PeerServer", "members_of"]
