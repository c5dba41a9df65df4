"""The gossip core's exception hierarchy: catch ``GossipError`` for all of them."""

from __future__ import annotations


class GossipError(Exception):
    """Base class of everything the gossip core raises on purpose."""


class ConfigError(GossipError, ValueError):
    """A configuration value that would make the protocol misbehave."""


class DecodeError(GossipError, ValueError):
    """Bytes from a peer that are not a valid gossip packet: wrong version byte, undecodable
    msgpack, an unknown message type, or a well-formed value of the wrong shape. The shell drops
    the packet (and may count it); nothing else is affected."""


class MetaTooLarge(GossipError, ValueError):
    """Member metadata whose encoding exceeds ``GossipConfig.meta_max_size``: trim labels or the
    GPU summary, or raise the limit (it must still fit one datagram)."""
