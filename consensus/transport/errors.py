"""The transport's exception hierarchy: catch ``TransportError`` for all of them."""

from __future__ import annotations


class TransportError(Exception):
    """Base class of everything the transport raises on purpose."""


class FrameError(TransportError):
    """Bytes from a peer that are not a valid frame: bad magic, unknown version or frame type, a
    frame over the size limit, undecodable msgpack, or a well-formed value that means nothing
    (a local message type, a negative index, a sender that is not the authenticated peer).

    The receiver closes that one connection and carries on; nothing else is affected."""


class PeerIdentityError(TransportError):
    """A peer certificate that does not name a node (``CN=node-<id>``), or names a different
    node than the one we meant to reach."""
