"""The read side of stable storage, as the core sees it, and an in-memory implementation.

The core never writes durable state itself: it hands entries, hard state and snapshots to the
runtime in a ``Ready``; the runtime makes them durable, then mirrors them into the ``Storage`` the
core reads (as etcd's server does with its WAL and ``MemoryStorage``). After a restart the runtime
rebuilds that ``Storage`` from disk before creating the core.

Index conventions (etcd's): the entries retained are ``first_index() .. last_index()``; the term of
``first_index() - 1`` is also known (it is the snapshot's), so that an append right after a
snapshot can still be matched.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .errors import CompactedError, UnavailableError
from .types import (
    EMPTY_HARD_STATE,
    EMPTY_SNAPSHOT,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMetadata,
    entry_size,
)


class Storage(Protocol):
    def initial_state(self) -> HardState: ...

    def entries(self, lo: int, hi: int, max_size: int) -> list[Entry]:
        """Entries ``[lo, hi)``, at least one if any, stopping before ``max_size`` bytes.

        Raises ``CompactedError`` if ``lo`` is compacted, ``UnavailableError`` if ``hi - 1`` is
        beyond the last entry.
        """
        ...

    def term(self, i: int) -> int:
        """The term of entry ``i``, valid for ``first_index() - 1 <= i <= last_index()``."""
        ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot:
        """The most recent snapshot (may raise ``SnapshotTemporarilyUnavailable``)."""
        ...


@runtime_checkable
class SnapshotStorage(Protocol):
    """What ``RawNode.compact`` needs on top of ``Storage``."""

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot: ...

    def compact(self, index: int) -> None: ...


def limit_size(entries: list[Entry], max_size: int) -> list[Entry]:
    """The longest prefix of ``entries`` within ``max_size`` bytes, but at least one entry."""
    if not entries:
        return entries
    total = entry_size(entries[0])
    for i in range(1, len(entries)):
        total += entry_size(entries[i])
        if total > max_size:
            return entries[:i]
    return entries


class MemoryStorage:
    """A ``Storage`` held in memory, with the mutators a runtime uses to mirror its disk.

    ``_ents[0]`` is a dummy entry standing for the snapshot (its index and term), which is what
    makes ``term(first_index() - 1)`` answerable.
    """

    def __init__(self) -> None:
        self.hard_state: HardState = EMPTY_HARD_STATE
        self._snapshot: Snapshot = EMPTY_SNAPSHOT
        self._ents: list[Entry] = [Entry(0, 0)]

    @classmethod
    def bootstrap(cls, conf_state: ConfState) -> MemoryStorage:
        """Storage for a founding member: an empty log whose base configuration is ``conf_state``.

        Founding members must all be bootstrapped with the same configuration. Members added
        later start from a plain ``MemoryStorage()`` and learn the configuration from the log.
        """
        s = cls()
        s._snapshot = Snapshot(SnapshotMetadata(0, 0, conf_state))
        return s

    # -- Storage --------------------------------------------------------------------------
    def initial_state(self) -> HardState:
        return self.hard_state

    def first_index(self) -> int:
        return self._ents[0].index + 1

    def last_index(self) -> int:
        return self._ents[0].index + len(self._ents) - 1

    def term(self, i: int) -> int:
        offset = self._ents[0].index
        if i < offset:
            raise CompactedError(f"index {i} is compacted (first is {offset + 1})")
        if i - offset >= len(self._ents):
            raise UnavailableError(f"index {i} is beyond the last entry {self.last_index()}")
        return self._ents[i - offset].term

    def entries(self, lo: int, hi: int, max_size: int) -> list[Entry]:
        offset = self._ents[0].index
        if lo <= offset:
            raise CompactedError(f"index {lo} is compacted (first is {offset + 1})")
        if hi > self.last_index() + 1:
            raise UnavailableError(f"entries up to {hi - 1} requested, last is {self.last_index()}")
        return limit_size(self._ents[lo - offset : hi - offset], max_size)

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- mutators (the runtime calls these after the matching durable write) ---------------
    def set_hard_state(self, hs: HardState) -> None:
        self.hard_state = hs

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace everything with ``snap`` (a snapshot received from the leader)."""
        if snap.metadata.index < self._snapshot.metadata.index:
            raise ValueError("snapshot is older than the current one")
        self._snapshot = snap
        self._ents = [Entry(snap.metadata.term, snap.metadata.index)]

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record a snapshot of the application state at ``index`` (then ``compact``)."""
        if index <= self._snapshot.metadata.index:
            raise ValueError(f"snapshot at {index} is not newer than {self._snapshot.metadata}")
        if index > self.last_index():
            raise UnavailableError(f"snapshot index {index} beyond last {self.last_index()}")
        snap = Snapshot(SnapshotMetadata(index, self.term(index), conf_state), data)
        self._snapshot = snap
        return snap

    def compact(self, index: int) -> None:
        """Drop entries up to and including ``index`` (keeping it as the dummy)."""
        offset = self._ents[0].index
        if index <= offset:
            return
        if index > self.last_index():
            raise UnavailableError(f"compact {index} beyond last {self.last_index()}")
        i = index - offset
        self._ents = [Entry(self._ents[i].term, index), *self._ents[i + 1 :]]

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Append, first discarding any stored entries at ``entries[0].index`` or later."""
        if not entries:
            return
        first = self.first_index()
        last = entries[-1].index
        if last < first:
            return  # all of it is already compacted
        if entries[0].index < first:
            entries = entries[first - entries[0].index :]
        offset = entries[0].index - self._ents[0].index
        if offset > len(self._ents):
            raise ValueError(
                f"missing log entries: last {self.last_index()}, appending at {entries[0].index}"
            )
        del self._ents[offset:]
        self._ents.extend(entries)
