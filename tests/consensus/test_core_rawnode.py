"""The RawNode API: configuration rules, the Ready contract, refusals with reasons, and the
regressions the simulator found."""

from __future__ import annotations

import random

import pytest

from consensus.core import (
    Config,
    ConfigError,
    ConfState,
    DropReason,
    Entry,
    MemoryStorage,
    Message,
    MessageType,
    ProposalDropped,
    RawNode,
    Role,
)
from consensus.sim.interaction import InteractionEnv

MT = MessageType


def node(nid: int = 1, voters: tuple[int, ...] = (1, 2, 3), **kw: object) -> RawNode:
    return RawNode(Config(id=nid, **kw), MemoryStorage.bootstrap(ConfState(frozenset(voters))))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"id": 0}, "positive"),
        ({"id": 1, "election_tick": 1, "heartbeat_tick": 1}, "greater than heartbeat"),
        ({"id": 1, "heartbeat_tick": 0}, "heartbeat_tick"),
        ({"id": 1, "max_inflight_msgs": 0}, "max_inflight_msgs"),
        ({"id": 1, "max_size_per_msg": -1}, "negative"),
        ({"id": 1, "max_size_per_msg": 100, "max_inflight_bytes": 10}, "at least"),
    ],
)
def test_invalid_configs_are_refused(kw: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RawNode(Config(**kw), MemoryStorage())  # type: ignore[arg-type]


def test_randomized_election_timeout_is_in_et_to_2et() -> None:
    seen = set()
    for seed in range(300):
        rn = node(rng=random.Random(seed))
        seen.add(rn.raft.randomized_election_timeout)
    assert seen == set(range(10, 20))


def test_single_voter_elects_itself_and_persists_before_applying() -> None:
    rn = node(voters=(1,))
    rn.campaign()
    rd = rn.ready()
    assert rd.soft_state is not None and rd.soft_state.role is Role.LEADER
    assert rd.hard_state is not None and rd.hard_state.vote == 1 and rd.must_sync
    # The empty entry is committed in the same batch that persists it: the contract has the
    # runtime persist ``entries`` before applying ``committed_entries``.
    assert [e.index for e in rd.entries] == [1]
    assert [e.index for e in rd.committed_entries] == [1]
    with pytest.raises(RuntimeError, match="advance"):
        rn.ready()
    rn.advance(rd)
    with pytest.raises(RuntimeError):
        rn.advance(rd)
    assert not rn.has_ready()


def test_messages_leave_only_through_ready_and_steps_may_interleave() -> None:
    rn = node()
    rn.campaign()
    rd = rn.ready()
    assert {m.type for m in rd.messages} == {MT.PRE_VOTE}
    assert not rn.raft.msgs
    # Stepping while the batch is being persisted is allowed: the answer goes to the next one.
    rn.step(Message(MT.PRE_VOTE_RESP, to=1, frm=2, term=1))
    assert not rn.has_ready()  # one batch outstanding at a time
    rn.advance(rd)
    rd2 = rn.ready()
    assert rd2.hard_state is not None and rd2.hard_state.term == 1 and rd2.hard_state.vote == 1
    assert {m.type for m in rd2.messages} == {MT.VOTE}
    assert rd2.must_sync


def test_commit_only_changes_need_no_sync() -> None:
    env = InteractionEnv()
    env.handle("add-nodes 3")
    env.handle("campaign 1")
    env.handle("stabilize")
    rn = env.nodes[2].rn
    assert rn is not None
    env.handle("propose 1 x")
    env.handle("process-ready 1")
    env.handle("deliver-msgs 2")
    rd = rn.ready()
    assert rd.entries and rd.must_sync
    rn.advance(rd)
    env.nodes[2].storage.append(rd.entries)
    rn.step(Message(MT.HEARTBEAT, to=2, frm=1, term=1, commit=2))
    rd = rn.ready()
    assert rd.hard_state is not None and rd.hard_state.commit == 2
    assert not rd.must_sync


def test_local_messages_are_refused_from_peers() -> None:
    rn = node()
    for t in (MT.HUP, MT.BEAT, MT.CHECK_QUORUM, MT.SNAP_STATUS, MT.UNREACHABLE):
        with pytest.raises(ValueError, match="local"):
            rn.step(Message(t, to=1, frm=2, term=1))


def test_requests_are_refused_with_reasons_never_silently() -> None:
    rn = node()
    with pytest.raises(ProposalDropped) as e:
        rn.propose(b"x")
    assert e.value.reason is DropReason.NO_LEADER
    for call in (lambda: rn.read_index(b"r"), lambda: rn.transfer_leader(2)):
        with pytest.raises(ProposalDropped) as e:
            call()
        assert e.value.reason is DropReason.NO_LEADER
    follower = node(disable_proposal_forwarding=True)
    follower.step(Message(MT.HEARTBEAT, to=1, frm=2, term=1))
    with pytest.raises(ProposalDropped) as e:
        follower.propose(b"x")
    assert e.value.reason is DropReason.FORWARDING_DISABLED
    assert "retry" in str(DropReason.NO_LEADER.value)


def test_a_forwarded_proposal_the_leader_refuses_is_counted() -> None:
    env = InteractionEnv()
    env.handle("add-nodes 3")
    env.handle("campaign 1")
    env.handle("stabilize")
    env.handle("transfer-leader 1 3")  # proposals are refused while it is in progress
    leader = env.nodes[1].rn
    assert leader is not None and leader.raft.lead_transferee == 3
    leader.step(Message(MT.PROP, to=1, frm=2, entries=(Entry(0, 0, b"fwd"),)))
    assert leader.raft.dropped_forwarded == 1


def test_compaction_requires_applied_entries() -> None:
    rn = node(voters=(1,))
    rn.campaign()
    rd = rn.ready()
    with pytest.raises(ValueError, match="applied"):
        rn.compact(1, b"state")
    rn.raft.log.storage.append(rd.entries)  # type: ignore[attr-defined]
    rn.advance(rd)
    snap = rn.compact(1, b"state")
    assert snap.metadata.index == 1 and snap.metadata.conf_state.voters == {1}


def test_status_reports_progress_on_the_leader() -> None:
    env = InteractionEnv()
    env.handle("add-nodes 3")
    env.handle("campaign 1")
    env.handle("stabilize")
    st = env.nodes[1].rn.status()  # type: ignore[union-attr]
    assert st.role is Role.LEADER and st.lead == 1 and st.commit == 1
    assert sorted(st.progress) == [1, 2, 3] and all(p.match == 1 for p in st.progress.values())
    assert env.nodes[2].rn.status().progress == {}  # type: ignore[union-attr]


def test_stale_acknowledgements_are_dropped_on_a_term_change() -> None:
    """Regression (simulator seed 266): an ack queued at term 1 for entries that a term-2 leader
    then truncated must not be sent, or a term-1 leader could count it toward a commit."""
    rn = node(nid=2)
    rn.step(Message(MT.APP, to=2, frm=1, term=1, index=0, log_term=0, entries=(Entry(1, 1),)))
    rd = rn.ready()  # persisting entry 1 ...
    rn.step(Message(MT.APP, to=2, frm=1, term=1, index=1, log_term=1, entries=(Entry(1, 2),)))
    assert any(m.type is MT.APP_RESP and m.index == 2 for m in rn.raft.msgs)
    # ... a term-2 leader overwrites index 2 before the next Ready is formed.
    rn.step(Message(MT.APP, to=2, frm=3, term=2, index=1, log_term=1, entries=(Entry(2, 2),)))
    rn.advance(rd)
    acks = [m for m in rn.ready().messages if m.type is MT.APP_RESP]
    assert [(m.term, m.index) for m in acks] == [(2, 2)]


def test_rejecting_a_vote_does_not_reset_the_election_timer() -> None:
    """Regression (simulator seed 527, PreVote off): a candidate with a stale log must not keep
    up-to-date nodes from ever timing out by raising the term."""
    rn = node(nid=2, pre_vote=False, check_quorum=False)
    rn.step(Message(MT.APP, to=2, frm=1, term=1, index=0, log_term=0, entries=(Entry(1, 1),)))
    for _ in range(5):
        rn.tick()
    rn.step(Message(MT.VOTE, to=2, frm=3, term=5, index=0, log_term=0))
    assert rn.raft.term == 5 and rn.raft.vote == 0  # refused: its log is older
    assert rn.raft.election_elapsed == 5
    rn.step(Message(MT.VOTE, to=2, frm=1, term=6, index=1, log_term=1))
    assert rn.raft.vote == 1 and rn.raft.election_elapsed == 0  # granting resets it


def test_default_rng_is_seeded_per_node() -> None:
    """Without an injected RNG, members must not share one timeout sequence (split votes)."""
    draws = {nid: node(nid).raft.randomized_election_timeout for nid in range(1, 21)}
    assert len(set(draws.values())) > 3
    assert draws == {nid: node(nid).raft.randomized_election_timeout for nid in range(1, 21)}
