"""Every tunable of one Raft member, with defaults and the rules that keep them sane.

Defaults follow etcd's server configuration (reference §A.4, §F.10): one heartbeat per tick and an
election timeout of ten ticks, so with a 100 ms tick followers time out after 1-2 s; PreVote and
CheckQuorum on; 1 MiB per append message; a bounded in-flight window in both messages and bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import ConfigError
from .types import NONE

MIB = 1 << 20


@dataclass(slots=True)
class Config:
    id: int
    election_tick: int = 10
    """Ticks without hearing from a leader before a follower campaigns (randomized in
    ``[election_tick, 2 * election_tick)``). Also the CheckQuorum period of a leader."""
    heartbeat_tick: int = 1
    """Ticks between a leader's heartbeats."""
    pre_vote: bool = True
    """Run a pre-election that changes no term before a real one, so that a node coming back from
    a partition does not depose a healthy leader (thesis §9.6)."""
    check_quorum: bool = True
    """A leader steps down when a quorum was not active in the last election timeout, and
    followers in contact with a leader ignore disruptive vote requests."""
    max_size_per_msg: int = MIB
    """Upper bound of the entry bytes in one append message (0 means one entry per message)."""
    max_inflight_msgs: int = 256
    """Append messages in flight to one follower in the replicate state."""
    max_inflight_bytes: int = 8 * MIB
    """Entry bytes in flight to one follower; bounds the bandwidth-delay product. 0: no bound."""
    max_uncommitted_entries_size: int = 16 * MIB
    """A leader refuses proposals once its uncommitted tail exceeds this many payload bytes
    (0: no bound). Protects against unbounded growth while no quorum acknowledges."""
    max_committed_size_per_ready: int = 8 * MIB
    """Upper bound of the committed entry bytes handed out in one Ready (at least one entry)."""
    disable_proposal_forwarding: bool = False
    """Refuse proposals at followers instead of forwarding them to the leader."""
    applied: int = 0
    """The last index the application has applied and persisted, when restarting with a durable
    state machine; 0 lets the core redeliver everything after the snapshot."""
    rng: random.Random | None = None
    """The only source of randomness (election timeouts). Inject a seeded one: determinism is what
    makes the simulator replay a failing seed bit for bit. ``None`` seeds one from the node ID, so
    that members never draw identical timeout sequences (which would make split votes likely)."""

    def validate(self) -> None:
        if self.id == NONE or self.id < 0:
            raise ConfigError(f"id must be a positive integer, got {self.id}")
        if self.heartbeat_tick <= 0:
            raise ConfigError("heartbeat_tick must be greater than 0")
        if self.election_tick <= self.heartbeat_tick:
            raise ConfigError(
                "election_tick must be greater than heartbeat_tick "
                f"(got {self.election_tick} <= {self.heartbeat_tick}); etcd suggests 10x"
            )
        if self.max_inflight_msgs <= 0:
            raise ConfigError("max_inflight_msgs must be greater than 0")
        for name in (
            "max_size_per_msg",
            "max_inflight_bytes",
            "max_uncommitted_entries_size",
            "max_committed_size_per_ready",
            "applied",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if 0 < self.max_inflight_bytes < self.max_size_per_msg:
            raise ConfigError("max_inflight_bytes must be at least max_size_per_msg")
