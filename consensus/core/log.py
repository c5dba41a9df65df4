"""The Raft log as one node sees it: stable storage plus an unstable (not yet durable) tail.

``Unstable`` holds entries (and possibly one incoming snapshot) that the core has accepted but the
runtime has not yet made durable. A ``Ready`` hands them out and marks them *in progress*; the
matching ``advance`` moves them to stable. Between the two the core keeps running, and a new leader
may overwrite part of the in-progress tail: ``stable_to`` then compares terms and ignores the
stale acknowledgement, and the overwritten entries are handed out again in the next ``Ready``.

``RaftLog`` also tracks the configuration the log establishes (see ``confchange``): every append,
truncation and snapshot restore updates it, so the node's configuration is always the latest one
in its own log.
"""

from __future__ import annotations

from .confchange import ConfigHistory
from .errors import CompactedError, InvariantViolation, StorageError, UnavailableError
from .storage import Storage, limit_size
from .types import ConfState, Entry, EntryType, Snapshot


class Unstable:
    __slots__ = ("snapshot", "entries", "offset", "snapshot_in_progress", "offset_in_progress")

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset
        self.snapshot_in_progress = False
        self.offset_in_progress = offset

    def maybe_first_index(self) -> int | None:
        if self.snapshot is not None:
            return self.snapshot.metadata.index + 1
        return None

    def maybe_last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        if self.snapshot is not None:
            return self.snapshot.metadata.index
        return None

    def maybe_term(self, i: int) -> int | None:
        if i < self.offset:
            snap = self.snapshot
            if snap is not None and snap.metadata.index == i:
                return snap.metadata.term
            return None
        pos = i - self.offset
        if pos < len(self.entries):
            return self.entries[pos].term
        if not self.entries and self.snapshot is not None and self.snapshot.metadata.index == i:
            return self.snapshot.metadata.term  # pragma: no cover - offset == index + 1
        return None

    def next_entries(self) -> list[Entry]:
        start = self.offset_in_progress - self.offset
        if start >= len(self.entries):
            return []
        return self.entries[start:]

    def next_snapshot(self) -> Snapshot | None:
        if self.snapshot is None or self.snapshot_in_progress:
            return None
        return self.snapshot

    def accept_in_progress(self) -> None:
        if self.entries:
            self.offset_in_progress = self.entries[-1].index + 1
        if self.snapshot is not None:
            self.snapshot_in_progress = True

    def stable_to(self, index: int, term: int) -> None:
        t = self.maybe_term(index)
        if t is None or index < self.offset:
            return
        if t != term:
            # Replaced by a newer leader's entries while the write was in flight; those newer
            # entries are still unstable and will be written by a later Ready.
            return
        drop = index + 1 - self.offset
        del self.entries[:drop]
        self.offset = index + 1
        self.offset_in_progress = max(self.offset_in_progress, self.offset)

    def stable_snap_to(self, index: int) -> None:
        if self.snapshot is not None and self.snapshot.metadata.index == index:
            self.snapshot = None
            self.snapshot_in_progress = False

    def restore(self, snap: Snapshot) -> None:
        self.offset = snap.metadata.index + 1
        self.offset_in_progress = self.offset
        self.entries = []
        self.snapshot = snap
        self.snapshot_in_progress = False

    def truncate_and_append(self, ents: list[Entry] | tuple[Entry, ...]) -> None:
        first = ents[0].index
        if first == self.offset + len(self.entries):
            self.entries.extend(ents)
        elif first <= self.offset:
            # Replaces the whole unstable tail (and, once written, stable entries >= first).
            self.entries = list(ents)
            self.offset = first
            self.offset_in_progress = first
        else:
            del self.entries[first - self.offset :]
            self.entries.extend(ents)
            self.offset_in_progress = min(self.offset_in_progress, first)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        return self.entries[lo - self.offset : hi - self.offset]


class RaftLog:
    __slots__ = (
        "storage",
        "unstable",
        "committed",
        "applying",
        "applied",
        "max_applying_size",
        "confs",
    )

    def __init__(self, storage: Storage, max_applying_size: int) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(last + 1)
        # Everything up to the snapshot is committed and applied by definition.
        self.committed = first - 1
        self.applying = first - 1
        self.applied = first - 1
        self.max_applying_size = max_applying_size
        snap = storage.snapshot()
        self.confs = ConfigHistory(snap.metadata.index, snap.metadata.conf_state)
        if last >= first:
            # A configuration is a function of the log: rebuild it from the stable entries.
            self.confs.observe(
                [e for e in storage.entries(first, last + 1, 1 << 62) if e.type != 0]
            )

    # -- indexes and terms ----------------------------------------------------------------
    def first_index(self) -> int:
        i = self.unstable.maybe_first_index()
        return i if i is not None else self.storage.first_index()

    def last_index(self) -> int:
        i = self.unstable.maybe_last_index()
        return i if i is not None else self.storage.last_index()

    def term(self, i: int) -> int:
        """Term of entry ``i``; raises ``CompactedError``/``UnavailableError`` out of range."""
        t = self.unstable.maybe_term(i)
        if t is not None:
            return t
        if i > self.last_index():
            raise UnavailableError(f"index {i} beyond last {self.last_index()}")
        return self.storage.term(i)

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, i: int, term: int) -> bool:
        try:
            return self.term(i) == term
        except StorageError:
            return False

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """Whether a log ending at (``last_index``, ``term``) is at least as new as ours (§5.4.1)."""
        our_term = self.last_term()
        return term > our_term or (term == our_term and last_index >= self.last_index())

    # -- configuration --------------------------------------------------------------------
    @property
    def conf_state(self) -> ConfState:
        return self.confs.latest

    # -- appending --------------------------------------------------------------------------
    def append(self, ents: list[Entry] | tuple[Entry, ...]) -> int:
        if not ents:
            return self.last_index()
        after = ents[0].index - 1
        if after < self.committed:
            raise InvariantViolation(
                f"append at {after + 1} would overwrite committed entries (commit {self.committed})"
            )
        self.unstable.truncate_and_append(ents)
        self.confs.truncate_from(ents[0].index)
        self.confs.observe(ents)
        return self.last_index()

    def find_conflict(self, ents: tuple[Entry, ...]) -> int:
        """Index of the first entry that is not already in the log with the same term, or 0."""
        for e in ents:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= ``index`` whose term is <= ``term``, and that term.

        Used for fast back-off: every entry above the returned index has a term greater than
        ``term``, so none of them can match the other side's entry at ``index``.
        """
        while index > 0:
            try:
                our = self.term(index)
            except StorageError:
                # Compacted or unavailable: we cannot rule it out, so it may match.
                return index, 0
            if our <= term:
                return index, our
            index -= 1
        return 0, 0

    def maybe_append(
        self, prev_index: int, prev_term: int, commit: int, ents: tuple[Entry, ...]
    ) -> int | None:
        """A follower's handling of an append; the last index it now matches, or None."""
        if not self.match_term(prev_index, prev_term):
            return None
        last_new = prev_index + len(ents)
        ci = self.find_conflict(ents)
        if ci:
            if ci <= self.committed:
                raise InvariantViolation(
                    f"entry {ci} conflicts with a committed entry (commit {self.committed})"
                )
            self.append(ents[ci - prev_index - 1 :])
        # Only what this message proved to match may be committed: entries after last_new may be
        # stale leftovers of an older term (atomix/copycat#265).
        self.commit_to(min(commit, last_new))
        return last_new

    # -- commit and apply ---------------------------------------------------------------------
    def commit_to(self, index: int) -> None:
        if index > self.committed:
            if index > self.last_index():
                raise InvariantViolation(
                    f"commit {index} is beyond the last index {self.last_index()}"
                )
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        """Commit up to ``index`` if that entry is from ``term`` (the leader's current term).

        Counting replicas only commits entries of the current term (§5.4.2, Figure 8); earlier
        entries become committed indirectly, as a prefix of it.
        """
        if index > self.committed and self.term(index) == term:
            self.commit_to(index)
            return True
        return False

    def applied_to(self, index: int) -> None:
        if index == 0:
            return
        if index > self.committed or index < self.applied:
            raise InvariantViolation(
                f"applied {index} outside [{self.applied}, committed {self.committed}]"
            )
        self.applied = index
        self.applying = max(self.applying, index)

    def has_next_or_in_progress_snapshot(self) -> bool:
        return self.unstable.snapshot is not None

    def next_committed_entries(self) -> list[Entry]:
        """Committed entries not yet handed out for applying.

        They may still be unstable: the Ready contract has the runtime persist ``entries`` before
        applying ``committed_entries``, so an entry is always durable before it is applied.
        """
        if self.has_next_or_in_progress_snapshot():
            return []
        lo = self.applying + 1
        hi = self.committed + 1
        if lo >= hi:
            return []
        return self.slice(lo, hi, self.max_applying_size)

    def has_next_committed_entries(self) -> bool:
        return not self.has_next_or_in_progress_snapshot() and self.committed > self.applying

    def snapshot(self) -> Snapshot:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    def restore(self, snap: Snapshot) -> None:
        self.committed = snap.metadata.index
        self.unstable.restore(snap)
        self.confs.reset(snap.metadata.index, snap.metadata.conf_state)

    def stable_to(self, index: int, term: int) -> None:
        self.unstable.stable_to(index, term)

    def stable_snap_to(self, index: int) -> None:
        self.unstable.stable_snap_to(index)

    # -- reading entries ---------------------------------------------------------------------
    def entries(self, lo: int, max_size: int) -> list[Entry]:
        last = self.last_index()
        if lo > last:
            return []
        return self.slice(lo, last + 1, max_size)

    def slice(self, lo: int, hi: int, max_size: int) -> list[Entry]:
        """Entries ``[lo, hi)`` within ``max_size`` bytes (at least one)."""
        first = self.first_index()
        if lo < first:
            raise CompactedError(f"index {lo} is compacted (first is {first})")
        if hi > self.last_index() + 1:
            raise UnavailableError(f"slice [{lo}, {hi}) beyond last {self.last_index()}")
        if lo >= hi:
            return []
        u = self.unstable.offset
        if hi <= u:
            return self.storage.entries(lo, hi, max_size)
        if lo >= u:
            return limit_size(self.unstable.slice(lo, hi), max_size)
        stable = self.storage.entries(lo, u, max_size)
        if len(stable) < u - lo:
            return stable  # the size limit was reached inside the stable part
        return limit_size(stable + self.unstable.slice(u, hi), max_size)

    def all_entries(self) -> list[Entry]:
        """Every retained entry (tests and the simulator's checks)."""
        return self.entries(self.first_index(), 1 << 62)


def is_conf_entry(e: Entry) -> bool:
    return e.type == EntryType.CONF_CHANGE
