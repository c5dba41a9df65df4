"""A pure, synchronous, deterministic Raft core in the shape of etcd-io/raft.

No I/O, no clock, no global randomness: the runtime feeds ``tick()`` and peer messages into a
``RawNode`` and carries out the ``Ready`` batches it returns (persist, send, apply, ``advance``).
See ``rawnode`` for the Ready contract and ``confchange`` for the membership-change rules.
"""

from .confchange import ConfChange, ConfChangeType, decode_conf_change
from .config import Config
from .errors import (
    CompactedError,
    ConfigError,
    DropReason,
    InvariantViolation,
    ProposalDropped,
    RaftError,
    SnapshotTemporarilyUnavailable,
    StorageError,
    UnavailableError,
)
from .progress import ProgressState
from .rawnode import RawNode, Ready, Status
from .storage import MemoryStorage, SnapshotStorage, Storage
from .types import (
    NONE,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Role,
    Snapshot,
    SnapshotMetadata,
    SoftState,
)

__all__ = [
    "NONE",
    "CompactedError",
    "ConfChange",
    "ConfChangeType",
    "ConfState",
    "Config",
    "ConfigError",
    "DropReason",
    "Entry",
    "EntryType",
    "HardState",
    "InvariantViolation",
    "MemoryStorage",
    "Message",
    "MessageType",
    "ProgressState",
    "ProposalDropped",
    "RaftError",
    "RawNode",
    "ReadState",
    "Ready",
    "Role",
    "Snapshot",
    "SnapshotMetadata",
    "SnapshotStorage",
    "SnapshotTemporarilyUnavailable",
    "SoftState",
    "Status",
    "Storage",
    "StorageError",
    "UnavailableError",
    "decode_conf_change",
]
