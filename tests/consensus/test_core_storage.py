"""MemoryStorage: etcd's index conventions (a dummy entry standing for the snapshot)."""

from __future__ import annotations

import pytest

from consensus.core import (
    CompactedError,
    ConfState,
    Entry,
    HardState,
    MemoryStorage,
    UnavailableError,
)
from consensus.core.storage import limit_size


def filled(n: int) -> MemoryStorage:
    ms = MemoryStorage()
    ms.append([Entry(1, i, b"e%d" % i) for i in range(1, n + 1)])
    return ms


def test_indexes_terms_and_ranges() -> None:
    ms = filled(5)
    assert (ms.first_index(), ms.last_index()) == (1, 5)
    assert ms.term(0) == 0 and ms.term(5) == 1
    with pytest.raises(UnavailableError):
        ms.term(6)
    assert [e.index for e in ms.entries(2, 5, 1 << 20)] == [2, 3, 4]
    with pytest.raises(UnavailableError):
        ms.entries(4, 7, 1 << 20)


def test_append_discards_the_conflicting_suffix() -> None:
    ms = filled(5)
    ms.append([Entry(2, 3, b"new")])
    assert ms.last_index() == 3 and ms.term(3) == 2
    with pytest.raises(ValueError, match="missing log entries"):
        ms.append([Entry(2, 9)])


def test_snapshot_compaction_and_bootstrap() -> None:
    ms = filled(6)
    cs = ConfState(frozenset({1, 2, 3}))
    snap = ms.create_snapshot(4, cs, b"state")
    ms.compact(4)
    assert snap.metadata.index == 4 and snap.metadata.term == 1
    assert (ms.first_index(), ms.last_index()) == (5, 6)
    assert ms.term(4) == 1
    with pytest.raises(CompactedError):
        ms.entries(4, 6, 1 << 20)
    with pytest.raises(ValueError):
        ms.create_snapshot(3, cs, b"older")
    # Appending entries the snapshot already covers ignores them.
    ms.append([Entry(1, 3), Entry(1, 4)])
    assert ms.first_index() == 5
    boot = MemoryStorage.bootstrap(cs)
    assert boot.snapshot().metadata.conf_state == cs
    assert boot.initial_state() == HardState()


def test_limit_size_returns_at_least_one_entry() -> None:
    es = [Entry(1, i, b"x" * 10) for i in range(1, 5)]
    assert len(limit_size(es, 0)) == 1
    assert len(limit_size(es, 52)) == 2  # 26 bytes per entry with the overhead
    assert len(limit_size(es, 1 << 20)) == 4
