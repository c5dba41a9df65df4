"""Durable storage: round trips, recovery, corruption refused, and a crash at every point."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from consensus.core.errors import CompactedError
from consensus.core.types import ConfState, Entry, HardState, Snapshot, SnapshotMetadata
from consensus.storage import CorruptStorageError, DiskStorage, fsync_floor

CONF = ConfState(frozenset({1, 2, 3}))


def ents(lo: int, hi: int, term: int = 1, tag: bytes = b"e") -> list[Entry]:
    return [Entry(term, i, tag + str(i).encode()) for i in range(lo, hi + 1)]


def state(s: DiskStorage) -> tuple[object, ...]:
    return (
        s.first_index(),
        s.last_index(),
        s.hard_state,
        s.snapshot().metadata,
        s.entries(s.first_index(), s.last_index() + 1, 1 << 30)
        if s.last_index() >= s.first_index()
        else [],
    )


def reopen(s: DiskStorage) -> DiskStorage:
    s.close()
    return DiskStorage(s.directory)


def test_roundtrip_truncation_snapshot_compaction(tmp_path: Path) -> None:
    s = DiskStorage(tmp_path)
    s.initialize(CONF)
    s.save(ents(1, 10), HardState(1, 1, 4))
    s.save(ents(7, 8, term=2, tag=b"n"), HardState(2, 3, 6))  # conflict: tail 7.. replaced
    assert s.last_index() == 8 and s.term(7) == 2
    before = state(s)
    s = reopen(s)
    assert state(s) == before and s.snapshot().metadata.conf_state == CONF
    s.create_snapshot(6, CONF, b"app@6")
    s.compact(5)
    assert s.first_index() == 6 and s.term(5) == 1
    with pytest.raises(CompactedError):
        s.entries(5, 7, 1 << 20)
    with pytest.raises(ValueError, match="snapshot covers only 6"):
        s.compact(7)
    before = state(s)
    s = reopen(s)
    assert state(s) == before and s.snapshot().data == b"app@6"
    assert [p.name for p in tmp_path.glob("snap-*")] == [s._snapshot_file.name]
    s.close()


def test_leader_snapshot_replaces_the_log(tmp_path: Path) -> None:
    s = DiskStorage(tmp_path)
    s.initialize(CONF)
    s.save(ents(1, 20), HardState(1, 1, 3))
    snap = Snapshot(SnapshotMetadata(50, 4, CONF), b"leader-state")
    s.save(ents(51, 52, term=4), HardState(4, 0, 50), snap)
    expect = state(s)
    assert (expect[0], expect[1]) == (51, 52)
    s = reopen(s)
    assert state(s) == expect and s.term(50) == 4
    s.close()


def test_bootstrap_refuses_existing_state(tmp_path: Path) -> None:
    s = DiskStorage(tmp_path)
    s.save(ents(1, 1), HardState(1, 0, 0))
    with pytest.raises(ValueError, match="refusing to bootstrap"):
        s.initialize(CONF)
    s.close()


def _damage(tmp_path: Path, sql: str) -> None:
    db = sqlite3.connect(tmp_path / "raft.db")
    db.execute(sql)
    db.commit()
    db.close()


@pytest.mark.parametrize(
    ("sql", "fragment"),
    [
        ("UPDATE entries SET data = x'00' WHERE idx = 3", "entry 3 fails its checksum"),
        ("DELETE FROM entries WHERE idx = 4", "gap"),
        ("DELETE FROM entries WHERE idx >= 4", "commit index 5 is beyond the last entry 3"),
        ("UPDATE meta SET value = x'0000000001' WHERE key = 'hard_state'", "fails its checksum"),
    ],
)
def test_corruption_refuses_to_start(tmp_path: Path, sql: str, fragment: str) -> None:
    s = DiskStorage(tmp_path)
    s.save(ents(1, 6), HardState(1, 1, 5))
    s.close()
    _damage(tmp_path, sql)
    with pytest.raises(CorruptStorageError, match=fragment):
        DiskStorage(tmp_path)


def test_damaged_snapshot_file_refuses_to_start(tmp_path: Path) -> None:
    s = DiskStorage(tmp_path)
    s.save(ents(1, 6), HardState(1, 1, 5))
    s.create_snapshot(5, CONF, b"x" * 1000)
    s.close()
    snap = next(tmp_path.glob("snap-*.snap"))
    raw = bytearray(snap.read_bytes())
    raw[-10] ^= 0xFF
    snap.write_bytes(bytes(raw))
    with pytest.raises(CorruptStorageError, match="fails its checksum"):
        DiskStorage(tmp_path)


# --- crash consistency: a writer process killed at each point -----------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from consensus.core.types import ConfState, Entry, HardState, Snapshot, SnapshotMetadata
    from consensus.storage import DiskStorage

    conf = ConfState(frozenset({1, 2, 3}))
    s = DiskStorage(sys.argv[1])
    s.initialize(conf)
    s.save([Entry(1, i, b"a%d" % i) for i in range(1, 11)], HardState(1, 1, 5))
    print("step1", flush=True)
    s.save([Entry(2, i, b"b%d" % i) for i in range(8, 14)], HardState(2, 2, 9))
    print("step2", flush=True)
    s.create_snapshot(9, conf, b"S" * 100_000)
    print("step3", flush=True)
    s.compact(8)
    print("step4", flush=True)
    s.save([Entry(3, i, b"c%d" % i) for i in range(21, 23)], HardState(3, 0, 20),
           Snapshot(SnapshotMetadata(20, 3, conf), b"L" * 50_000))
    print("step5", flush=True)
    """
)

POINTS = [
    "write_between_entries_and_hard_state",
    "write_before_commit",
    "write_after_commit",
    "snapshot_partial_write",
    "snapshot_before_rename",
    "snapshot_before_dir_fsync",
    "create_snapshot_before_commit",
    "compact_before_commit",
]


def _run_writer(directory: Path, crash_at: str | None) -> list[str]:
    env = dict(os.environ)
    env.pop("MESHGPU_STORAGE_CRASH_AT", None)
    if crash_at:
        env["MESHGPU_STORAGE_CRASH_AT"] = crash_at
    r = subprocess.run(
        [sys.executable, "-c", WRITER, str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode in (0, 86), r.stderr
    return r.stdout.split()


def _expected_states(tmp_path: Path) -> dict[str, tuple[object, ...]]:
    """The state after each step of an uninterrupted run, replayed in-process."""
    from consensus.core.types import Snapshot as Snap

    out: dict[str, tuple[object, ...]] = {}
    s = DiskStorage(tmp_path / "reference")
    s.initialize(CONF)
    out["step0"] = state(s)
    s.save([Entry(1, i, b"a%d" % i) for i in range(1, 11)], HardState(1, 1, 5))
    out["step1"] = state(s)
    s.save([Entry(2, i, b"b%d" % i) for i in range(8, 14)], HardState(2, 2, 9))
    out["step2"] = state(s)
    s.create_snapshot(9, CONF, b"S" * 100_000)
    out["step3"] = state(s)
    s.compact(8)
    out["step4"] = state(s)
    s.save(
        [Entry(3, i, b"c%d" % i) for i in range(21, 23)],
        HardState(3, 0, 20),
        Snap(SnapshotMetadata(20, 3, CONF), b"L" * 50_000),
    )
    out["step5"] = state(s)
    s.close()
    return out


@pytest.mark.parametrize("point", POINTS)
def test_crash_at_every_point_recovers_a_whole_step(tmp_path: Path, point: str) -> None:
    expected = _expected_states(tmp_path)
    d = tmp_path / "crashed"
    done = _run_writer(d, point)
    assert len(done) < 5, f"{point} was never reached"
    recovered = DiskStorage(d)
    got = state(recovered)
    last_done = done[-1] if done else "step0"
    nxt = f"step{int(last_done[-1]) + 1}"
    # Atomicity: the interrupted step either happened entirely or not at all -- never a mix
    # of its entries and hard state, never a half-written snapshot.
    assert got in (expected[last_done], expected.get(nxt)), (point, got)
    assert not list(d.glob("*.tmp")), "a stray temporary snapshot survived recovery"
    # The recovered node keeps working.
    recovered.save(
        [Entry(9, recovered.last_index() + 1, b"after")],
        HardState(9, 0, recovered.hard_state.commit),
    )
    recovered = reopen(recovered)
    assert (
        recovered.entries(recovered.last_index(), recovered.last_index() + 1, 100)[0].data
        == b"after"
    )
    recovered.close()


def test_torn_wal_tail_recovers_a_prefix_of_batches(tmp_path: Path) -> None:
    """Cut the WAL of a crashed writer at many offsets: every cut recovers to the state after
    some whole number of batches (SQLite's WAL frames are checksummed; a torn commit is undone)."""
    src = tmp_path / "src"
    done = _run_writer(
        src, "write_after_commit"
    )  # crashes after step1's commit: WAL not checkpointed
    assert done == []
    wal = (src / "raft.db-wal").read_bytes()
    assert len(wal) > 0
    expected = _expected_states(tmp_path)
    empty = DiskStorage(tmp_path / "empty")
    allowed = [state(empty), expected["step0"], expected["step1"]]
    empty.close()
    for cut in sorted(
        {0, 32, len(wal) // 3, len(wal) // 2, len(wal) - 100, len(wal) - 1, len(wal)}
    ):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / "raft.db").write_bytes((src / "raft.db").read_bytes())
        (d / "raft.db-wal").write_bytes(wal[:cut])
        s = DiskStorage(d)
        assert state(s) in allowed, cut
        s.close()


def test_fsync_floor_measures(tmp_path: Path) -> None:
    samples = fsync_floor(tmp_path, samples=5)
    assert len(samples) == 5 and all(x > 0 for x in samples)
