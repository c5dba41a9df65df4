"""Every tunable of the gossip core, with memberlist's LAN/WAN/local profiles and derived values.

The three profiles copy hashicorp/memberlist ``config.go`` (``DefaultLANConfig``,
``DefaultWANConfig``, ``DefaultLocalConfig``) knob for knob; the functions at the bottom are its
``util.go`` formulas (``suspicionTimeout``, ``retransmitLimit``, ``pushPullScale``). Note that the
code, not the comments, of memberlist is followed: the suspicion timeout scales with
``log10(N)``, not ``log(N+1)`` (reference raft-and-gossip.md §E.2).

Times are seconds (floats), the unit the core's ``now`` arguments use.

Knobs that memberlist does not have come from Serf, which sits on memberlist in Consul and Nomad:
reconnect attempts to failed members and reaping of failed/left members
(``ReconnectInterval`` 30 s, ``ReconnectTimeout`` and ``TombstoneTimeout`` 24 h,
``ReapInterval`` 15 s in ``serf/config.go``); memberlist alone never retries a member it
declared dead, so two halves of a healed partition stay split (metallb#589).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ConfigError

PUSH_PULL_SCALE_THRESHOLD = 32
"""memberlist ``pushPullScaleThreshold``: below this many members the push/pull interval is used
as is."""


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """The tunables of one gossip member. Build one with :meth:`lan`, :meth:`wan` or :meth:`local`
    and adjust with :meth:`replace`."""

    probe_interval: float = 1.0
    """Time between failure probes (memberlist ``ProbeInterval``). Lifeguard's awareness score
    multiplies it (up to ``awareness_max_multiplier``) while this member looks unhealthy."""
    probe_timeout: float = 0.5
    """Wait for a direct ack before asking ``indirect_checks`` members for help
    (``ProbeTimeout``); "the RTT of the network". Also how long an indirect prober waits before it
    answers with a nack. Not scaled by awareness (memberlist: waiting longer does not get UDP
    through; the scaled probe interval already gives indirect acks and TCP more time)."""
    indirect_checks: int = 3
    """Members asked to ping a target that missed its direct ack (``IndirectChecks``)."""
    gossip_interval: float = 0.2
    """Time between gossip rounds (``GossipInterval``). Decoupled from probing so that
    broadcasts spread faster than one hop per probe (Serf's deliberate change from SWIM)."""
    gossip_nodes: int = 3
    """Members sent queued broadcasts in each gossip round (``GossipNodes``)."""
    gossip_to_the_dead_time: float = 30.0
    """How long dead members are still gossiped to, so that they learn of their death and refute
    (``GossipToTheDeadTime``)."""
    retransmit_mult: int = 4
    """Each broadcast is sent ``retransmit_mult * ceil(log10(N + 1))`` times
    (``RetransmitMult``)."""
    suspicion_mult: int = 4
    """Minimum suspicion timeout is ``suspicion_mult * max(1, log10(N)) * probe_interval``
    (``SuspicionMult``). Lifeguard expects ``suspicion_mult - 2`` independent confirmations."""
    suspicion_max_timeout_mult: int = 6
    """Maximum suspicion timeout (no confirmations yet) as a multiple of the minimum
    (``SuspicionMaxTimeoutMult``)."""
    awareness_max_multiplier: int = 8
    """Upper bound of Lifeguard's local-health multiplier (``AwarenessMaxMultiplier``)."""
    push_pull_interval: float = 30.0
    """Time between full state exchanges with one random member (``PushPullInterval``), scaled up
    above 32 members by :func:`push_pull_scale`. 0 disables periodic push/pull."""
    tcp_timeout: float = 10.0
    """Deadline the shell gives a stream exchange (push/pull, join) (``TCPTimeout``)."""
    disable_tcp_pings: bool = False
    """Skip the reliable-stream ping sent alongside indirect probes (``DisableTcpPings``). Left on,
    it keeps a member whose UDP is lossy (but whose TCP works) from being suspected."""
    udp_buffer_size: int = 1400
    """Byte budget of one datagram, piggybacked broadcasts included (``UDPBufferSize``)."""
    meta_max_size: int = 1024
    """Largest encoded metadata map. memberlist allows 512 bytes; meshgpu metadata carries a GPU
    summary and labels, and an alive message with 1 KiB of metadata still fits one datagram."""
    lifeguard: bool = True
    """Lifeguard's three extensions (local health awareness with nacks, suspicion timeouts that
    shrink with independent confirmations, the buddy system). Off gives classic SWIM as memberlist
    shipped it before Lifeguard: fixed suspicion timeout (the minimum), no awareness, no nacks, no
    buddy. Only the simulator's comparison should turn it off."""
    reconnect_interval: float = 30.0
    """Serf ``ReconnectInterval``: the cluster as a whole tries about one push/pull per interval
    with each failed member (each member tries with probability failed/alive). 0 disables."""
    reconnect_timeout: float = 24 * 3600.0
    """Serf ``ReconnectTimeout``: a failed member is forgotten (reaped) after this long."""
    tombstone_timeout: float = 24 * 3600.0
    """Serf ``TombstoneTimeout``: a member that left is forgotten after this long."""
    reap_interval: float = 15.0
    """Serf ``ReapInterval``: how often failed and left members are checked for reaping."""

    # ------------------------------------------------------------------ profiles

    @classmethod
    def lan(cls) -> GossipConfig:
        """memberlist ``DefaultLANConfig``: a single data center, 1 s probes, 200 ms gossip."""
        return cls()

    @classmethod
    def wan(cls) -> GossipConfig:
        """memberlist ``DefaultWANConfig``: members across the internet or regions."""
        return cls(
            tcp_timeout=30.0,
            suspicion_mult=6,
            push_pull_interval=60.0,
            probe_timeout=3.0,
            probe_interval=5.0,
            gossip_nodes=4,
            gossip_interval=0.5,
            gossip_to_the_dead_time=60.0,
        )

    @classmethod
    def local(cls) -> GossipConfig:
        """memberlist ``DefaultLocalConfig``: loopback or one switch, where packets rarely drop."""
        return cls(
            tcp_timeout=1.0,
            indirect_checks=1,
            retransmit_mult=2,
            suspicion_mult=3,
            push_pull_interval=15.0,
            probe_timeout=0.2,
            probe_interval=1.0,
            gossip_interval=0.1,
            gossip_to_the_dead_time=15.0,
        )

    @classmethod
    def profile(cls, name: str) -> GossipConfig:
        """The profile called ``name`` (``lan``, ``wan`` or ``local``)."""
        try:
            return {"lan": cls.lan, "wan": cls.wan, "local": cls.local}[name]()
        except KeyError:
            raise ConfigError(f"unknown gossip profile {name!r}; use lan, wan or local") from None

    @classmethod
    def from_spec(cls, spec: str) -> GossipConfig:
        """``PROFILE[,knob=value,...]``: a profile with some knobs changed, e.g. ``wan`` or
        ``local,probe_interval=0.3,probe_timeout=0.1`` (the agent's ``--gossip`` flag). Knobs
        are the field names of this class; values take the type of the profile's value."""
        name, *pairs = (part.strip() for part in spec.split(","))
        cfg = cls.profile(name or "lan")
        changes: dict[str, object] = {}
        for pair in pairs:
            if not pair:
                continue
            key, eq, text = (x.strip() for x in pair.partition("="))
            if not eq or not hasattr(cfg, key):
                raise ConfigError(f"gossip setting {pair!r} is not knob=value with a known knob")
            current = getattr(cfg, key)
            try:
                if isinstance(current, bool):
                    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(text)
                    changes[key] = text.lower() in ("true", "1", "yes")
                elif isinstance(current, int):
                    changes[key] = int(text)
                else:
                    changes[key] = float(text)
            except ValueError:
                raise ConfigError(
                    f"gossip setting {key}={text!r} needs a {type(current).__name__}"
                ) from None
        return cfg.replace(**changes)

    def replace(self, **changes: object) -> GossipConfig:
        """A copy with ``changes`` applied, validated."""
        cfg = dataclasses.replace(self, **changes)  # type: ignore[arg-type]
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise :class:`ConfigError` when a value makes the protocol misbehave."""
        positive = (
            "probe_interval",
            "probe_timeout",
            "gossip_interval",
            "tcp_timeout",
            "reap_interval",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.probe_timeout >= self.probe_interval:
            raise ConfigError("probe_timeout must be shorter than probe_interval")
        if self.indirect_checks < 0 or self.gossip_nodes < 1:
            raise ConfigError("indirect_checks must be >= 0 and gossip_nodes >= 1")
        if self.retransmit_mult < 1 or self.suspicion_mult < 1:
            raise ConfigError("retransmit_mult and suspicion_mult must be >= 1")
        if self.suspicion_max_timeout_mult < 1 or self.awareness_max_multiplier < 1:
            raise ConfigError(
                "suspicion_max_timeout_mult and awareness_max_multiplier must be >= 1"
            )
        if self.udp_buffer_size < 256 or self.meta_max_size > self.udp_buffer_size - 128:
            raise ConfigError("udp_buffer_size must be >= 256 and leave 128 bytes beside metadata")
        for name in ("push_pull_interval", "reconnect_interval", "gossip_to_the_dead_time"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")

    # ------------------------------------------------------------------ derived values

    def suspicion_min(self, n: int) -> float:
        """Shortest suspicion timeout in a cluster of ``n`` members (memberlist
        ``suspicionTimeout``): reached once ``suspicion_mult - 2`` members confirmed."""
        return suspicion_timeout(self.suspicion_mult, n, self.probe_interval)

    def suspicion_max(self, n: int) -> float:
        """Longest suspicion timeout (Lifeguard: no independent confirmation yet)."""
        return self.suspicion_max_timeout_mult * self.suspicion_min(n)

    def retransmit_limit(self, n: int) -> int:
        """How many times each broadcast is sent in a cluster of ``n`` members."""
        return retransmit_limit(self.retransmit_mult, n)

    def push_pull_period(self, n: int) -> float:
        """Time between one member's push/pulls in a cluster of ``n`` members."""
        return push_pull_scale(self.push_pull_interval, n)

    def expected_detection_time(self, n: int) -> float:
        """Expected time from a crash until the first member declares it dead.

        SWIM's expected time to first detection is ``e / (e - 1)`` protocol periods (each period
        some member probes the crashed one with probability ``1 - 1/e``; the probe then takes the
        rest of its period to fail); the accuser's suspicion then lasts the minimum timeout,
        since with N large the ``suspicion_mult - 2`` confirmations that Lifeguard asks for
        arrive within a few probe periods (and classic SWIM uses the minimum as its fixed
        timeout). Dissemination of the verdict to everyone adds a few gossip rounds on top, see
        :meth:`expected_dissemination_time`."""
        return math.e / (math.e - 1.0) * self.probe_interval + self.suspicion_min(n)

    def expected_dissemination_time(self, n: int) -> float:
        """Rough time for a broadcast to reach everyone: an epidemic with fan-out
        ``gossip_nodes`` per ``gossip_interval`` needs about ``log(n) / log(fan-out + 1)`` rounds
        plus ``ln(n)`` rounds for the last few members (Pittel's bound for push gossip)."""
        if n <= 1:
            return 0.0
        rounds = math.log(n) / math.log(self.gossip_nodes + 1) + math.log(n) / self.gossip_nodes
        return rounds * self.gossip_interval


def suspicion_timeout(suspicion_mult: int, n: int, interval: float) -> float:
    """memberlist ``suspicionTimeout``: ``mult * max(1, log10(max(1, n))) * interval``, with the
    scale truncated to milliseconds as the Go code does."""
    node_scale = max(1.0, math.log10(max(1.0, float(n))))
    return suspicion_mult * math.floor(node_scale * 1000.0) / 1000.0 * interval


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """memberlist ``retransmitLimit``: ``mult * ceil(log10(n + 1))``."""
    return retransmit_mult * math.ceil(math.log10(float(n + 1)))


def push_pull_scale(interval: float, n: int) -> float:
    """memberlist ``pushPullScale``: the interval times ``ceil(log2(n) - log2(32)) + 1`` above 32
    members, so that full syncs do not saturate the network as the cluster grows."""
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return interval
    multiplier = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1.0
    return multiplier * interval
