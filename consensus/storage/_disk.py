"""Durable Raft storage: the log and hard state in SQLite, snapshots as files.

``DiskStorage`` is the core's ``Storage`` (reads are served from an in-memory mirror, as etcd's
server pairs its WAL with ``MemoryStorage``) plus durable writers. The runtime's storage task calls
``write(...)`` in a worker thread -- one SQLite transaction, hence one fsync, for a whole Ready
batch (group commit) -- and only then ``mirror(...)`` on the task that owns the core, and only
then sends the messages that depend on the new state.

On-disk layout of ``<dir>``::

    raft.db       SQLite, WAL mode, synchronous=FULL
                  entries(idx PK, term, type, data, crc)   crc32 over (idx, term, type, data)
                  meta(key PK, value)                      hard_state, log_start, snapshot, format
    snap-<term>-<index>.snap   the current snapshot (older ones are removed once superseded)

Recovery refuses to start on damage it cannot explain (checksum mismatch, a gap in the log, a
commit index beyond the log): it raises ``CorruptStorageError`` with what to do. A transaction that
was torn by a crash is rolled back by SQLite's WAL recovery, which is exactly the "torn tail"
case: the batch either fully happened or did not.

A write the disk cannot take (full, over quota, read-only, failing) raises ``StorageFull`` with
SQLite's own reason (never masked by a failed ROLLBACK): its transaction is rolled back, the mirror
is untouched and a snapshot file it began is removed, so the same write may simply be retried.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import msgpack

from consensus.core.storage import MemoryStorage
from consensus.core.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMetadata,
)
from consensus.storage._faults import crash_point
from consensus.storage._full import StorageFull, is_full
from consensus.storage._snapshot import (
    CorruptStorageError,
    fsync_dir,
    read_snapshot,
    write_snapshot,
)

FORMAT = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY, term INTEGER NOT NULL, type INTEGER NOT NULL,
    data BLOB NOT NULL, crc INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


def _entry_crc(idx: int, term: int, typ: int, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(struct.pack(">QQB", idx, term, typ)))


def _pack(value: object) -> bytes:
    body = msgpack.packb(value)
    return struct.pack(">I", zlib.crc32(body)) + body


def _unpack(blob: bytes, what: str, path: Path) -> object:
    if len(blob) < 4 or struct.unpack(">I", blob[:4])[0] != zlib.crc32(blob[4:]):
        raise CorruptStorageError(f"{what} in {path} fails its checksum: the database is damaged")
    return msgpack.unpackb(blob[4:])


class DiskStorage(MemoryStorage):
    """See the module docstring. Not thread-safe by itself: one writer thread at a time (the
    runtime's storage task), and mirror/reads on the core's task."""

    def __init__(self, directory: str | Path) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.directory / "raft.db"
        self._lock = threading.Lock()
        # The log is private (0600): created so before SQLite opens it, since SQLite gives the
        # -wal and -shm files it creates later the database file's mode.
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._snapshot_file: Path | None = None
        self._durable_snapshot = 0  # index of the snapshot the disk records (under _lock)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._load()
        except sqlite3.Error as e:
            self._db.close()
            if is_full(e):
                raise StorageFull(f"cannot open {self.path}: {e}") from e
            raise CorruptStorageError(f"cannot open {self.path}: {e}") from e
        except BaseException:
            self._db.close()
            raise

    # -- recovery ---------------------------------------------------------------------------
    def _meta(self, key: str) -> object | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else _unpack(row[0], f"meta {key!r}", self.path)

    def _load(self) -> None:
        fmt = self._meta("format")
        if fmt is None:
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (_pack(FORMAT),))
        elif fmt != FORMAT:
            raise CorruptStorageError(
                f"{self.path} has storage format {fmt}, this build reads {FORMAT}"
            )
        snap_meta = self._meta("snapshot")
        snap = Snapshot()
        if snap_meta is not None:
            assert isinstance(snap_meta, dict)
            self._snapshot_file = self.directory / snap_meta["file"]
            snap = read_snapshot(self._snapshot_file)
            if (snap.metadata.index, snap.metadata.term) != (snap_meta["index"], snap_meta["term"]):
                raise CorruptStorageError(
                    f"snapshot file {self._snapshot_file} does not match {self.path}"
                )
        elif (conf := self._meta("bootstrap_conf")) is not None:
            assert isinstance(conf, list)
            snap = Snapshot(SnapshotMetadata(0, 0, ConfState(*(frozenset(x) for x in conf))))
        self._remove_stray_snapshots()

        start = self._meta("log_start")
        # Entries start right after ``log_start`` (set by compaction and by a leader's
        # snapshot); a snapshot taken locally does not move it.
        start_index, start_term = start if start is not None else (0, 0)  # type: ignore[misc]
        entries: list[Entry] = []
        expect = start_index + 1
        for idx, term, typ, data, crc in self._db.execute(
            "SELECT idx, term, type, data, crc FROM entries ORDER BY idx"
        ):
            if idx != expect:
                raise CorruptStorageError(
                    f"{self.path}: the log has a gap (expected entry {expect}, found {idx}); "
                    "restore this node from a peer (remove its data dir and rejoin)"
                )
            if _entry_crc(idx, term, typ, data) != crc:
                raise CorruptStorageError(
                    f"{self.path}: entry {idx} fails its checksum; the file is damaged. "
                    "Restore this node from a peer (remove its data dir and rejoin)"
                )
            entries.append(Entry(term, idx, bytes(data), EntryType(typ)))
            expect += 1
        hs = self._meta("hard_state")
        hard = HardState(*hs) if hs is not None else HardState()  # type: ignore[misc]
        last = start_index + len(entries)
        if hard.commit > last:
            raise CorruptStorageError(
                f"{self.path}: commit index {hard.commit} is beyond the last entry {last}; "
                "acknowledged entries are missing"
            )
        self._durable_snapshot = snap.metadata.index
        # Rebuild the mirror (MemoryStorage's dummy entry stands for log_start).
        self.hard_state = hard
        self._snapshot = snap
        self._ents = [Entry(start_term, start_index), *entries]

    def _remove_stray_snapshots(self) -> None:
        """Temporary files of an interrupted write, and snapshots nobody points at any more."""
        for p in self.directory.glob("snap-*"):
            if p != self._snapshot_file:
                p.unlink(missing_ok=True)

    # -- bootstrap ----------------------------------------------------------------------------
    def initialize(self, conf_state: ConfState) -> None:
        """Make this an empty founding member of ``conf_state`` (only on a fresh directory)."""
        if self.last_index() > 0 or self.hard_state != HardState() or self._meta("bootstrap_conf"):
            raise ValueError(
                f"{self.directory} already holds Raft state; refusing to bootstrap over it"
            )
        conf = [sorted(conf_state.voters), sorted(conf_state.learners), sorted(conf_state.removed)]
        with self._lock, self._transaction() as db:
            db.execute("INSERT INTO meta VALUES ('bootstrap_conf', ?)", (_pack(conf),))
        self._snapshot = Snapshot(SnapshotMetadata(0, 0, conf_state))

    # -- durable writes (worker thread) -------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (the caller holds ``_lock``). On any failure it is rolled
        back -- unless SQLite already did (a full disk makes it), when ROLLBACK itself would
        fail and hide the reason -- and a full disk is raised as ``StorageFull``."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException as e:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the first error is the one that matters
            if is_full(e) and not isinstance(e, StorageFull):
                raise StorageFull(f"cannot write to {self.path}: {e}") from e
            raise

    def _write_snapshot(self, snapshot: Snapshot) -> Path:
        try:
            return write_snapshot(self.directory, snapshot)
        except OSError as e:
            if is_full(e):
                raise StorageFull(f"cannot write a snapshot to {self.directory}: {e}") from e
            raise

    def write(
        self,
        entries: Sequence[Entry] = (),
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
    ) -> None:
        """Make one Ready batch durable: one transaction, one fsync. Does not touch the mirror."""
        snap_file = None
        if snapshot is not None and snapshot.metadata.index > 0:
            snap_file = self._write_snapshot(snapshot)
        try:
            with self._lock, self._transaction() as db:
                if snap_file is not None:
                    md = snapshot.metadata  # type: ignore[union-attr]
                    # A snapshot from the leader replaces the whole log (as the mirror's
                    # apply_snapshot does); entries of the same Ready follow it below.
                    db.execute("DELETE FROM entries")
                    self._put_meta(
                        "snapshot", {"index": md.index, "term": md.term, "file": snap_file.name}
                    )
                    self._put_meta("log_start", [md.index, md.term])
                    self._durable_snapshot = md.index
                if entries:
                    db.execute("DELETE FROM entries WHERE idx >= ?", (entries[0].index,))
                    db.executemany(
                        "INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
                        [
                            (
                                e.index,
                                e.term,
                                int(e.type),
                                e.data,
                                _entry_crc(e.index, e.term, int(e.type), e.data),
                            )
                            for e in entries
                        ],
                    )
                crash_point("write_between_entries_and_hard_state")
                if hard_state is not None:
                    self._put_meta(
                        "hard_state", [hard_state.term, hard_state.vote, hard_state.commit]
                    )
                crash_point("write_before_commit")
        except BaseException:
            if snap_file is not None and snap_file != self._snapshot_file:
                snap_file.unlink(missing_ok=True)  # not recorded: a stray file, space back
            raise
        crash_point("write_after_commit")
        if snap_file is not None:
            self._retire_snapshots(snap_file)

    def _put_meta(self, key: str, value: object) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, _pack(value)))

    def _retire_snapshots(self, current: Path) -> None:
        old = self._snapshot_file
        self._snapshot_file = current
        if old is not None and old != current:
            old.unlink(missing_ok=True)

    # -- the in-memory mirror (the core's task, after write) ----------------------------------
    def mirror(
        self,
        entries: Sequence[Entry] = (),
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
    ) -> None:
        if snapshot is not None and snapshot.metadata.index > 0:
            MemoryStorage.apply_snapshot(self, snapshot)
        if entries:
            MemoryStorage.append(self, list(entries))
        if hard_state is not None:
            MemoryStorage.set_hard_state(self, hard_state)

    def save(
        self,
        entries: Sequence[Entry] = (),
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
    ) -> None:
        """``write`` then ``mirror``: for callers without a separate writer thread."""
        self.write(entries, hard_state, snapshot)
        self.mirror(entries, hard_state, snapshot)

    # The MemoryStorage mutators would change only memory; make the durable path the only path.
    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        self.save(entries=entries)

    def set_hard_state(self, hs: HardState) -> None:
        self.save(hard_state=hs)

    def apply_snapshot(self, snap: Snapshot) -> None:
        self.save(snapshot=snap)

    # -- snapshots and compaction -------------------------------------------------------------
    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Durably record a snapshot of the application at ``index`` (entries are kept until
        ``compact``, so slow followers can still be fed from the log)."""
        previous = self._snapshot
        snap = MemoryStorage.create_snapshot(self, index, conf_state, data)
        path = None
        try:
            path = self._write_snapshot(snap)
            with self._lock, self._transaction():
                self._put_meta(
                    "snapshot", {"index": index, "term": snap.metadata.term, "file": path.name}
                )
                crash_point("create_snapshot_before_commit")
                self._durable_snapshot = index
        except BaseException:
            self._snapshot = previous  # the mirror never claims a snapshot the disk lacks
            if path is not None and path != self._snapshot_file:
                path.unlink(missing_ok=True)
            raise
        self._retire_snapshots(path)
        return snap

    def persist_snapshot(self, metadata: SnapshotMetadata, data: bytes) -> Snapshot | None:
        """The disk half of ``create_snapshot`` + ``compact``, for a worker thread while the
        owner of the mirror goes on: durably record a snapshot of the application and drop the
        entries it covers from disk. The owner then calls ``adopt_snapshot`` with what this
        returns. None if a newer snapshot reached the disk meanwhile (one from the leader):
        this one is dropped."""
        snap = Snapshot(metadata, data)
        index, term = metadata.index, metadata.term
        path = self._write_snapshot(snap)
        try:
            with self._lock:
                if index <= self._durable_snapshot:
                    path.unlink(missing_ok=True)
                    return None
                with self._transaction() as db:
                    self._put_meta("snapshot", {"index": index, "term": term, "file": path.name})
                    db.execute("DELETE FROM entries WHERE idx <= ?", (index,))
                    self._put_meta("log_start", [index, term])
                    crash_point("persist_snapshot_before_commit")
                self._durable_snapshot = index
                self._retire_snapshots(path)
        except BaseException:
            if path != self._snapshot_file:
                path.unlink(missing_ok=True)
            raise
        return snap

    def adopt_snapshot(self, snap: Snapshot) -> bool:
        """The mirror's half (the owner's task): start the in-memory log at ``snap``, which
        ``persist_snapshot`` made durable. False if the mirror already has a newer one."""
        if snap.metadata.index <= self._snapshot.metadata.index:
            return False
        self._snapshot = snap
        MemoryStorage.compact(self, snap.metadata.index)
        return True

    def compact(self, index: int) -> None:
        """Drop entries up to ``index``; only what a durable snapshot covers may go."""
        if index > self._snapshot.metadata.index:
            raise ValueError(
                f"cannot compact to {index}: the latest snapshot covers only {self._snapshot.metadata.index}"
            )
        if index < self.first_index():
            return
        term = self.term(index)
        with self._lock, self._transaction() as db:
            db.execute("DELETE FROM entries WHERE idx <= ?", (index,))
            self._put_meta("log_start", [index, term])
            crash_point("compact_before_commit")
        MemoryStorage.compact(self, index)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> DiskStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fsync_floor(directory: str | Path, samples: int = 200) -> list[float]:
    """Seconds per write+fsync of one small record in ``directory``: the disk's floor."""
    import time

    path = Path(directory) / ".fsync-probe"
    out = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i in range(samples):
            t = time.perf_counter()
            os.write(fd, i.to_bytes(8, "big") * 8)
            os.fsync(fd)
            out.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    fsync_dir(Path(directory))
    return out
