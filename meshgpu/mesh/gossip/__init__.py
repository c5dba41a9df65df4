"""SWIM + Lifeguard gossip: failure detection and metadata dissemination for the mesh.

A pure core (:class:`Gossip`: no sockets, no clock, randomness injected) in memberlist's shape,
one mechanism per module: :mod:`.config` (LAN/WAN/local profiles and derived values),
:mod:`.probe` (randomized round-robin probes, indirect probes, nacks), :mod:`.state`
(incarnations, suspicion, death, refutation, merging), :mod:`.suspicion` (timeouts that shrink
with confirmations), :mod:`.awareness` (local health), :mod:`.queue` (transmit-limited
broadcasts), :mod:`.members` (member table), :mod:`.codec` (msgpack wire format); :mod:`.core`
ties them together behind :class:`Gossip`. :mod:`.sim` runs thousands of cores in virtual
time.

:mod:`.keyring` seals datagrams with the cluster's gossip keys (AES-GCM), and
:mod:`.shell` is the trio shell that runs a core on a UDP socket with streams over the Raft
transport; the shell is not re-exported here, so that importing the pure core never imports trio.
"""

from .codec import VERSION, decode, encode
from .config import GossipConfig, push_pull_scale, retransmit_limit, suspicion_timeout
from .core import Gossip, Outgoing
from .errors import ConfigError, DecodeError, GossipError, MetaTooLarge
from .events import EventKind, MemberEvent
from .keyring import Keyring, new_key
from .members import MemberInfo
from .messages import (
    Ack,
    Addr,
    Alive,
    Dead,
    IndirectPing,
    MemberRecord,
    MemberState,
    Message,
    Meta,
    Nack,
    Ping,
    PushPull,
    Suspect,
)

__all__ = [
    "VERSION",
    "Ack",
    "Addr",
    "Alive",
    "ConfigError",
    "Dead",
    "DecodeError",
    "EventKind",
    "Gossip",
    "GossipConfig",
    "GossipError",
    "IndirectPing",
    "Keyring",
    "MemberEvent",
    "MemberInfo",
    "MemberRecord",
    "MemberState",
    "Message",
    "Meta",
    "MetaTooLarge",
    "Nack",
    "Outgoing",
    "Ping",
    "PushPull",
    "Suspect",
    "decode",
    "encode",
    "new_key",
    "push_pull_scale",
    "retransmit_limit",
    "suspicion_timeout",
]
