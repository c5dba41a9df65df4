"""A data directory that cannot take writes now: its disk is full or over quota, read-only, or
failing. Such a write raises ``StorageFull`` (having written nothing that counts); the writer
may retry once space is freed. Reads of what is already stored are unaffected."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
# SQLite's primary result codes (the low byte of an extended code) for the same conditions.
_SQLITE_FULL, _SQLITE_READONLY, _SQLITE_IOERR = 13, 8, 10


class StorageFull(Exception):
    """The write did not happen: the disk cannot take it now (see the message). Retrying once
    space is freed is safe."""


def is_full(e: BaseException) -> bool:
    """Whether ``e`` says the disk cannot take writes (not a bug, not damage)."""
    if isinstance(e, StorageFull):
        return True
    if isinstance(e, OSError):
        return e.errno in FULL_ERRNOS
    if isinstance(e, sqlite3.Error):
        code = getattr(e, "sqlite_errorcode", None)
        if code is None:  # defensive: SQLite's messages for the same conditions
            return any(m in str(e) for m in ("disk is full", "readonly database", "disk I/O error"))
        return code & 0xFF in (_SQLITE_FULL, _SQLITE_READONLY, _SQLITE_IOERR)
    return False


def free_bytes(path: str | Path) -> int:
    """Bytes this process may still write on ``path``'s file system (root may use the blocks
    reserved for it)."""
    st = os.statvfs(path)
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize
