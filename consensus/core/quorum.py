"""Majority arithmetic: the commit index a quorum has reached, and the outcome of a vote.

Kept separate and tiny because everything safe about Raft rests on it; the property tests compare
it against the naive definitions (every majority subset) on random inputs.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping


class VoteResult(enum.Enum):
    PENDING = "pending"
    WON = "won"
    LOST = "lost"


def majority(n: int) -> int:
    """The smallest number of members that forms a quorum of ``n`` voters."""
    return n // 2 + 1


def committed_index(voters: Collection[int], match: Mapping[int, int]) -> int:
    """The highest index that a majority of ``voters`` has acknowledged.

    Voters without an entry in ``match`` count as having acknowledged nothing. An empty voter set
    commits nothing: the core never lets a configuration lose its last voter, so this only happens
    on a node that has not yet learned any configuration.
    """
    n = len(voters)
    if n == 0:
        return 0
    acked = sorted((match.get(v, 0) for v in voters), reverse=True)
    # The quorum-th highest acknowledgement is held by at least a quorum of voters.
    return acked[majority(n) - 1]


def vote_result(voters: Collection[int], votes: Mapping[int, bool]) -> VoteResult:
    """WON once a majority granted, LOST once a majority can no longer grant, else PENDING.

    Votes from IDs outside ``voters`` are ignored: a learner must answer vote requests (it may be
    a voter in the candidate's newer configuration) but its answer never counts here.
    """
    n = len(voters)
    if n == 0:
        # No voters: nobody can win. Report LOST so a candidate steps back down.
        return VoteResult.LOST
    granted = rejected = 0
    for v in voters:
        vote = votes.get(v)
        if vote is None:
            continue
        if vote:
            granted += 1
        else:
            rejected += 1
    q = majority(n)
    if granted >= q:
        return VoteResult.WON
    if n - rejected < q:
        return VoteResult.LOST
    return VoteResult.PENDING


def quorum_active(voters: Collection[int], active: Collection[int]) -> bool:
    """Whether a majority of ``voters`` is in ``active`` (CheckQuorum)."""
    n = len(voters)
    if n == 0:
        return False
    return sum(1 for v in voters if v in active) >= majority(n)
