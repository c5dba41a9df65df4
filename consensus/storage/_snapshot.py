"""Snapshot files: one file per snapshot, written atomically and verified on read.

Layout: ``MGSNAP01`` magic, a 4-byte big-endian header length, a msgpack header (format version,
index, term, conf state, data length, SHA-256 of the data), then the data. Writes go to a
temporary file that is fsynced, renamed into place, and the directory fsynced, so a crash leaves
either the old set of files or the new one plus, at worst, a stray ``.tmp`` that recovery removes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import msgpack

from consensus.core.types import ConfState, Snapshot, SnapshotMetadata
from consensus.storage._faults import crash_point

MAGIC = b"MGSNAP01"
FORMAT = 1


class CorruptStorageError(RuntimeError):
    """Durable Raft state fails a check; the node must not start on it (never truncated
    silently: a node that forgets acknowledged entries can break safety)."""


def snapshot_name(index: int, term: int) -> str:
    return f"snap-{term:016x}-{index:016x}.snap"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _conf(cs: ConfState) -> list[list[int]]:
    return [sorted(cs.voters), sorted(cs.learners), sorted(cs.removed)]


def write_snapshot(directory: Path, snap: Snapshot) -> Path:
    md = snap.metadata
    header = msgpack.packb(
        {
            "v": FORMAT,
            "index": md.index,
            "term": md.term,
            "conf": _conf(md.conf_state),
            "len": len(snap.data),
            "sha256": hashlib.sha256(snap.data).digest(),
        }
    )
    final = directory / snapshot_name(md.index, md.term)
    tmp = final.with_suffix(".snap.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(MAGIC + struct.pack(">I", len(header)) + header)
            half = len(snap.data) // 2
            f.write(snap.data[:half])
            crash_point("snapshot_partial_write")
            f.write(snap.data[half:])
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk gets its space back at once
        raise
    crash_point("snapshot_before_rename")
    os.replace(tmp, final)
    crash_point("snapshot_before_dir_fsync")
    fsync_dir(directory)
    return final


def read_snapshot(path: Path) -> Snapshot:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CorruptStorageError(f"cannot read snapshot {path}: {e}") from e
    if raw[:8] != MAGIC or len(raw) < 12:
        raise CorruptStorageError(f"{path} is not a meshgpu snapshot (bad magic)")
    (hlen,) = struct.unpack(">I", raw[8:12])
    try:
        h = msgpack.unpackb(raw[12 : 12 + hlen])
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise CorruptStorageError(f"snapshot {path} has a damaged header: {e}") from e
    if not isinstance(h, dict) or h.get("v") != FORMAT:
        raise CorruptStorageError(f"snapshot {path} has an unknown format {h!r:.80}")
    data = raw[12 + hlen :]
    if len(data) != h["len"] or hashlib.sha256(data).digest() != h["sha256"]:
        raise CorruptStorageError(
            f"snapshot {path} fails its checksum (length {len(data)} vs {h['len']}): the file is damaged"
        )
    voters, learners, removed = h["conf"]
    md = SnapshotMetadata(
        h["index"], h["term"], ConfState(frozenset(voters), frozenset(learners), frozenset(removed))
    )
    return Snapshot(md, data)
