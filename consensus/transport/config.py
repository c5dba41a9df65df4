"""Every transport tunable, with its default and the reason for it."""

from __future__ import annotations

from dataclasses import dataclass

from .codec import DEFAULT_MAX_FRAME_SIZE, HEADER_SIZE


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Tunables of one ``Transport``. The defaults suit a LAN with the core's default
    ``max_size_per_msg`` (1 MiB), a 100 ms heartbeat and a 1 s election timeout."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest frame body accepted or produced (8 MiB). A bigger Ready batch is split over
    several frames, still written at once; a single message larger than this is dropped and the
    peer reported unreachable (raise ``max_frame_size`` or lower ``max_size_per_msg``)."""

    queue_max_messages: int = 4096
    """Outbound messages waiting for one peer (etcd's stream buffer is 4096). When full, a new
    batch for that peer is dropped and ``on_unreachable`` called."""

    queue_max_bytes: int = 64 * 1024 * 1024
    """The same bound in bytes of entry payload and context, so that a slow peer cannot make us
    hold gigabytes of appends."""

    snapshot_chunk_size: int = 512 * 1024
    """Snapshot bytes per SNAP_CHUNK frame: small enough that each chunk encrypts in well under
    a millisecond, large enough that per-frame overhead is noise."""

    max_snapshot_size: int = 4 * 1024 * 1024 * 1024
    """Largest snapshot accepted from a peer (held in memory while it arrives)."""

    connect_timeout: float = 2.0
    """TCP connect + TLS handshake + HELLO exchange when dialing, seconds."""

    handshake_timeout: float = 5.0
    """How long an accepted connection may take to authenticate and say HELLO."""

    write_timeout: float = 10.0
    """A write that makes no progress for this long (a peer that stopped reading, e.g.
    SIGSTOPped) drops the connection; its queue overflows long before and reports it."""

    snapshot_idle_timeout: float = 30.0
    """Longest wait for the next snapshot frame (either side) before giving up on a transfer."""

    snapshot_ack_timeout: float = 30.0
    """How long the sender waits, after the last chunk, for the receiver to hand the snapshot to
    its node and acknowledge."""

    backoff_initial: float = 0.05
    """First reconnect delay, seconds; it doubles per failure up to ``backoff_max``."""

    backoff_max: float = 1.0
    """Reconnect delay cap: a restarted peer is redialed within about a second. A connection
    that stayed up at least this long resets the delay to ``backoff_initial``."""

    max_inbound_connections: int = 256
    """Accepted connections alive at once (authenticated or not); extra ones are closed at
    once, so a flood of half-open handshakes cannot exhaust file descriptors."""

    receive_size: int = 256 * 1024
    """Bytes asked of the socket per read."""

    def __post_init__(self) -> None:
        if self.max_frame_size < 1024 or self.max_frame_size > 2**32 - 1:
            raise ValueError("max_frame_size must be between 1 KiB and 4 GiB")
        if not 0 < self.snapshot_chunk_size <= self.max_frame_size:
            raise ValueError("snapshot_chunk_size must be positive and at most max_frame_size")
        if self.queue_max_messages < 1 or self.queue_max_bytes < 1:
            raise ValueError("queue bounds must be positive")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        if self.max_inbound_connections < 1:
            raise ValueError("max_inbound_connections must be positive")
        if self.receive_size < HEADER_SIZE:
            raise ValueError("receive_size is too small")
