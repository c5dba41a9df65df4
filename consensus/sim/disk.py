"""A node's disk: what is durable, and what was written but not yet synced.

Writes are records appended in order (snapshot, then each entry, then the hard state, as the
Ready contract orders them). ``sync`` makes every pending record durable. A crash keeps a random
*prefix* of the pending records - the model of a log whose checksummed records are recovered up to
the first torn one - or none of them. Nothing that was synced is ever lost.
"""

from __future__ import annotations

import random

from consensus.core import (
    ConfState,
    Entry,
    HardState,
    MemoryStorage,
    Snapshot,
    SnapshotMetadata,
)

Record = tuple[str, object]


class Disk:
    __slots__ = ("hard_state", "snapshot", "entries", "pending", "torn_writes")

    def __init__(self, bootstrap: ConfState | None) -> None:
        self.hard_state = HardState()
        self.snapshot = Snapshot(SnapshotMetadata(0, 0, bootstrap or ConfState()))
        self.entries: list[Entry] = []  # contiguous, right after the snapshot
        self.pending: list[Record] = []
        self.torn_writes = 0

    # -- writing ----------------------------------------------------------------------------
    def write(
        self, snapshot: Snapshot | None, entries: tuple[Entry, ...], hs: HardState | None
    ) -> None:
        if snapshot is not None:
            self.pending.append(("snap", snapshot))
        for e in entries:
            self.pending.append(("ent", e))
        if hs is not None:
            self.pending.append(("hs", hs))

    def sync(self) -> None:
        for rec in self.pending:
            self._apply(rec)
        self.pending.clear()

    def _apply(self, rec: Record) -> None:
        kind, val = rec
        if kind == "ent":
            assert isinstance(val, Entry)
            base = self.snapshot.metadata.index
            if val.index <= base:
                return
            pos = val.index - base - 1
            if pos > len(self.entries):
                raise AssertionError(f"disk: gap before entry {val.index}")
            del self.entries[pos:]
            self.entries.append(val)
        elif kind == "hs":
            assert isinstance(val, HardState)
            self.hard_state = val
        else:
            assert isinstance(val, Snapshot)
            self.snapshot = val
            self.entries = []

    def compact(self, snap: Snapshot) -> None:
        """Durably install a locally taken snapshot and drop the entries it covers."""
        idx = snap.metadata.index
        self.snapshot = snap
        self.entries = [e for e in self.entries if e.index > idx]

    # -- crashes ----------------------------------------------------------------------------
    def crash(self, rng: random.Random, tear_probability: float) -> int:
        """Lose unsynced records, possibly keeping a torn prefix; returns how many survived."""
        kept = 0
        if self.pending and rng.random() < tear_probability:
            kept = rng.randrange(len(self.pending) + 1)
            for rec in self.pending[:kept]:
                self._apply(rec)
            if kept:
                self.torn_writes += 1
        self.pending.clear()
        return kept

    # -- reading back -----------------------------------------------------------------------
    def last_index(self) -> int:
        if self.entries:
            return self.entries[-1].index
        return self.snapshot.metadata.index

    def load(self) -> MemoryStorage:
        """The storage a restarted node reads (what its runtime would rebuild from disk)."""
        ms = MemoryStorage()
        ms.apply_snapshot(self.snapshot)
        ms.append(list(self.entries))
        ms.set_hard_state(self.hard_state)
        return ms
