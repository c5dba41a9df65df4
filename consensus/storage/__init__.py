"""Durable storage for the Raft core: SQLite log and hard state, file snapshots."""

from consensus.storage._disk import DiskStorage, fsync_floor
from consensus.storage._snapshot import CorruptStorageError, read_snapshot, write_snapshot

__all__ = ["CorruptStorageError", "DiskStorage", "fsync_floor", "read_snapshot", "write_snapshot"]
