"""Node-to-node calls over the mutual-TLS peer port (the transport's ``APP`` streams): code
transfer, log and metric proxying, join forwarding. ``wire``: the frames; ``server``: the
callee, one ``on_stream`` shared with gossip; ``client``: ``PeerClient``."""

from .client import PeerClient
from .server import PeerHandlers, PeerServer
from .wire import PeerError

__all__ = ["PeerClient", "PeerError", "PeerHandlers", "PeerServer"]
