"""The log: stable storage plus the unstable tail, under appends, truncations and persistence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consensus.core import CompactedError, Entry, InvariantViolation, MemoryStorage
from consensus.core.log import RaftLog, Unstable
from consensus.core.types import Snapshot, SnapshotMetadata


def ents(*pairs: tuple[int, int]) -> list[Entry]:
    return [Entry(t, i, b"%d/%d" % (t, i)) for i, t in pairs]


def test_unstable_truncate_and_append_keeps_in_progress_consistent() -> None:
    u = Unstable(5)
    u.truncate_and_append(ents((5, 1), (6, 1), (7, 1)))
    u.accept_in_progress()  # a Ready took 5-7
    assert u.next_entries() == []
    # A new leader overwrites from 6 while the write is in flight: 6 and 7 must be written again.
    u.truncate_and_append(ents((6, 2)))
    assert [e.index for e in u.next_entries()] == [6]
    # The in-flight write completes; its acknowledgement for 7/1 is stale and ignored...
    u.stable_to(7, 1)
    assert [e.index for e in u.entries] == [5, 6]
    # ...and an acknowledgement for 5/1 only retires entry 5.
    u.stable_to(5, 1)
    assert u.offset == 6 and [e.term for e in u.entries] == [2]


def test_unstable_replacing_stable_entries_restarts_the_tail() -> None:
    u = Unstable(5)
    u.truncate_and_append(ents((3, 2), (4, 2)))
    assert u.offset == 3 and u.offset_in_progress == 3


def make_log(stable: list[Entry], committed: int = 0) -> RaftLog:
    ms = MemoryStorage()
    ms.append(stable)
    log = RaftLog(ms, 1 << 20)
    log.committed = committed
    return log


def test_maybe_append_truncates_only_on_a_real_conflict() -> None:
    log = make_log(ents((1, 1), (2, 1), (3, 1)), committed=1)
    # An old append whose entries we already have: nothing changes, nothing is lost.
    assert log.maybe_append(1, 1, 1, tuple(ents((2, 1)))) == 2
    assert log.last_index() == 3
    # A conflicting entry at 3: the suffix from 3 is replaced.
    assert log.maybe_append(2, 1, 3, tuple(ents((3, 2), (4, 2)))) == 4
    assert [e.term for e in log.all_entries()] == [1, 1, 2, 2]
    # Mismatched previous entry: refused.
    assert log.maybe_append(4, 1, 4, ()) is None


def test_follower_commits_only_what_the_append_proved() -> None:
    log = make_log(ents((1, 1), (2, 1), (3, 1), (4, 1)))
    # The leader's commit is 4, but this message only shows that we match up to 2.
    assert log.maybe_append(1, 1, 4, tuple(ents((2, 1)))) == 2
    assert log.committed == 2


def test_commit_never_moves_back_or_past_the_log() -> None:
    log = make_log(ents((1, 1), (2, 1)))
    log.commit_to(2)
    log.commit_to(1)
    assert log.committed == 2
    with pytest.raises(InvariantViolation):
        log.commit_to(3)


def test_committed_entries_are_never_overwritten() -> None:
    log = make_log(ents((1, 1), (2, 1)), committed=2)
    with pytest.raises(InvariantViolation):
        log.append(ents((2, 2)))


def test_leader_commits_only_its_own_term_by_counting() -> None:
    log = make_log(ents((1, 1), (2, 1)))
    log.append(ents((3, 2)))
    assert not log.maybe_commit(2, 2)  # entry 2 is from term 1
    assert log.maybe_commit(3, 2)
    assert log.committed == 3


def test_find_conflict_by_term_skips_whole_terms() -> None:
    log = make_log(ents((1, 1), (2, 1), (3, 3), (4, 3), (5, 3), (6, 5)))
    assert log.find_conflict_by_term(6, 4) == (5, 3)
    assert log.find_conflict_by_term(6, 2) == (2, 1)
    assert log.find_conflict_by_term(6, 0) == (0, 0)


def test_terms_and_slices_across_a_snapshot() -> None:
    ms = MemoryStorage()
    ms.apply_snapshot(Snapshot(SnapshotMetadata(5, 2)))
    ms.append(ents((6, 2), (7, 3)))
    log = RaftLog(ms, 1 << 20)
    assert log.first_index() == 6 and log.committed == 5
    assert log.term(5) == 2  # the snapshot's term is still known for matching
    with pytest.raises(CompactedError):
        log.term(4)
    with pytest.raises(CompactedError):
        log.slice(5, 7, 1 << 20)
    log.append(ents((8, 3)))
    assert [e.index for e in log.slice(6, 9, 1 << 20)] == [6, 7, 8]
    # Size limits hold across the stable/unstable boundary, but always return one entry.
    assert [e.index for e in log.slice(6, 9, 0)] == [6]


# A model-based check: random appends (at random positions above the commit index) and
# persistence steps keep the log equal to a plain list.
ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 6), st.integers(1, 4)),
        st.tuples(st.just("persist"), st.integers(0, 0), st.integers(0, 0)),
        st.tuples(st.just("commit"), st.integers(0, 6), st.integers(0, 0)),
    ),
    max_size=40,
)


@given(ops)
def test_log_matches_a_list_model(steps: list[tuple[str, int, int]]) -> None:
    ms = MemoryStorage()
    log = RaftLog(ms, 1 << 20)
    model: list[Entry] = []
    term = 1
    for op, a, b in steps:
        if op == "append":
            term += 1
            start = max(log.committed + 1, len(model) + 1 - a)
            new = [Entry(term, start + k, b"x") for k in range(b)]
            log.append(new)
            model = model[: start - 1] + new
        elif op == "persist":
            # What a Ready would hand out, written to storage, then acknowledged.
            batch = log.unstable.next_entries()
            log.unstable.accept_in_progress()
            if batch:
                ms.append(batch)
                log.stable_to(batch[-1].index, batch[-1].term)
        else:
            log.commit_to(min(len(model), log.committed + a))
        assert log.last_index() == len(model)
        assert log.all_entries() == model
        for e in model:
            assert log.term(e.index) == e.term
