"""Membership changes: the validity rules and the configuration history of a log."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consensus.core import ConfChange, ConfChangeType, ConfState, DropReason, ProposalDropped
from consensus.core.confchange import (
    ConfigHistory,
    apply_change,
    decode_conf_change,
    encode_conf_change,
)
from consensus.core.types import Entry, EntryType

CT = ConfChangeType
BASE = ConfState(frozenset({1, 2, 3}), frozenset({4}))


@pytest.mark.parametrize(
    ("cc", "voters", "learners"),
    [
        (ConfChange(CT.ADD_VOTER, 5), {1, 2, 3, 5}, {4}),
        (ConfChange(CT.ADD_VOTER, 4), {1, 2, 3, 4}, set()),  # promote
        (ConfChange(CT.ADD_LEARNER, 3), {1, 2}, {3, 4}),  # demote
        (ConfChange(CT.ADD_LEARNER, 6), {1, 2, 3}, {4, 6}),
        (ConfChange(CT.REMOVE, 2), {1, 3}, {4}),
        (ConfChange(CT.REMOVE, 4), {1, 2, 3}, set()),
    ],
)
def test_valid_changes(cc: ConfChange, voters: set[int], learners: set[int]) -> None:
    cs = apply_change(BASE, cc)
    assert cs.voters == voters and cs.learners == learners
    # A single-server change moves at most one voter: old and new majorities overlap.
    assert len(cs.voters ^ BASE.voters) <= 1


@pytest.mark.parametrize(
    "cc",
    [
        ConfChange(CT.ADD_VOTER, 1),
        ConfChange(CT.ADD_LEARNER, 4),
        ConfChange(CT.REMOVE, 9),
        ConfChange(CT.ADD_VOTER, 0),
        ConfChange(CT.ADD_VOTER, -3),
    ],
)
def test_invalid_changes(cc: ConfChange) -> None:
    with pytest.raises(ProposalDropped) as e:
        apply_change(BASE, cc)
    assert e.value.reason is DropReason.CONF_CHANGE_INVALID


def test_last_voter_cannot_leave_and_ids_are_never_reused() -> None:
    one = ConfState(frozenset({1}))
    for cc in (ConfChange(CT.REMOVE, 1), ConfChange(CT.ADD_LEARNER, 1)):
        with pytest.raises(ProposalDropped):
            apply_change(one, cc)
    gone = apply_change(BASE, ConfChange(CT.REMOVE, 3))
    assert gone.removed == {3}
    for typ in CT:
        with pytest.raises(ProposalDropped, match="never be reused"):
            apply_change(gone, ConfChange(typ, 3))


ids = st.frozensets(st.integers(1, 50), max_size=6)


@given(
    typ=st.sampled_from(list(CT)),
    node=st.integers(1, 1 << 40),
    ctx=st.binary(max_size=20),
    voters=ids,
    learners=ids,
    removed=ids,
)
def test_encoding_round_trips(
    typ: CT,
    node: int,
    ctx: bytes,
    voters: frozenset[int],
    learners: frozenset[int],
    removed: frozenset[int],
) -> None:
    cc = ConfChange(typ, node, ctx)
    cs = ConfState(voters, learners - voters, removed)
    assert decode_conf_change(encode_conf_change(cc, cs)) == (cc, cs)
    assert decode_conf_change(encode_conf_change(cc)) == (cc, None)


def conf_entry(index: int, cs: ConfState) -> Entry:
    data = encode_conf_change(ConfChange(CT.ADD_VOTER, 9), cs)
    return Entry(1, index, data, EntryType.CONF_CHANGE)


def test_history_follows_appends_truncations_and_compaction() -> None:
    c1 = ConfState(frozenset({1, 2}))
    c2 = ConfState(frozenset({1, 2, 3}))
    c3 = ConfState(frozenset({1, 2, 3, 4}))
    h = ConfigHistory(0, c1)
    h.observe([Entry(1, 1), conf_entry(2, c2), Entry(1, 3), conf_entry(4, c3)])
    assert h.latest == c3 and h.latest_index == 4
    assert h.at(1) == c1 and h.at(2) == c2 and h.at(3) == c2 and h.at(9) == c3
    h.truncate_from(4)  # a new leader replaced the suffix: the change never happened
    assert h.latest == c2 and h.latest_index == 2
    h.compact_to(3)
    assert h.at(3) == c2
    with pytest.raises(ValueError):
        h.at(1)
    h.truncate_from(0)  # never drops the configuration in force at the snapshot
    assert h.latest == c2
