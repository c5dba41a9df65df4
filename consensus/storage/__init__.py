"""Durable storage for the Raft core: SQLite log and hard state, file snapshots."""

from consensus.storage._disk import DiskStorage, fsync_floor
from consensus.storage._full import FULL_ERRNOS, StorageFull, free_bytes, is_full
from consensus.storage._snapshot import CorruptStorageError, read_snapshot, write_snapshot

__all__ = [
    "FULL_ERRNOS",
    "CorruptStorageError",
    "DiskStorage",
    "StorageFull",
    "free_bytes",
    "fsync_floor",
    "is_full",
    "read_snapshot",
    "write_snapshot",
]
