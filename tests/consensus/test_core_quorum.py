"""Majority arithmetic against its naive definition (every majority subset), on random inputs."""

from __future__ import annotations

from itertools import combinations

from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.core.quorum import (
    VoteResult,
    committed_index,
    majority,
    quorum_active,
    vote_result,
)

voter_sets = st.frozensets(st.integers(1, 9), min_size=1, max_size=7)


def naive_committed(voters: frozenset[int], match: dict[int, int]) -> int:
    """The largest index that every member of some majority has acknowledged."""
    q = majority(len(voters))
    best = 0
    for group in combinations(sorted(voters), q):
        best = max(best, min(match.get(v, 0) for v in group))
    return best


def naive_vote(voters: frozenset[int], votes: dict[int, bool]) -> VoteResult:
    q = majority(len(voters))
    yes = [v for v in voters if votes.get(v) is True]
    undecided = [v for v in voters if v not in votes]
    if len(yes) >= q:
        return VoteResult.WON
    if len(yes) + len(undecided) >= q:
        return VoteResult.PENDING
    return VoteResult.LOST


@settings(max_examples=1000)
@given(voters=voter_sets, data=st.data())
def test_committed_index_matches_naive(voters: frozenset[int], data: st.DataObject) -> None:
    # Include non-voters in ``match``: they must never count.
    match = data.draw(st.dictionaries(st.integers(1, 12), st.integers(0, 20)))
    assert committed_index(voters, match) == naive_committed(voters, match)


@settings(max_examples=1000)
@given(voters=voter_sets, data=st.data())
def test_vote_result_matches_naive(voters: frozenset[int], data: st.DataObject) -> None:
    votes = data.draw(st.dictionaries(st.integers(1, 12), st.booleans()))
    assert vote_result(voters, votes) == naive_vote(voters, votes)


@given(voters=voter_sets, active=st.frozensets(st.integers(1, 12)))
def test_quorum_active_matches_naive(voters: frozenset[int], active: frozenset[int]) -> None:
    assert quorum_active(voters, active) == (len(voters & active) >= majority(len(voters)))


def test_empty_configuration_commits_and_wins_nothing() -> None:
    assert committed_index([], {1: 5}) == 0
    assert vote_result([], {1: True}) is VoteResult.LOST
    assert not quorum_active([], {1})


def test_majority_sizes() -> None:
    assert [majority(n) for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]
