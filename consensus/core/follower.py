"""Step functions of followers and (pre-)candidates, and their handling of leader messages."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import DropReason, ProposalDropped
from .leader import bcast_append
from .quorum import VoteResult
from .types import NONE, Message, MessageType, ReadState, Role, Snapshot

if TYPE_CHECKING:
    from .raft import Raft

MT = MessageType


def step_follower(r: Raft, m: Message) -> None:
    t = m.type
    if t is MT.APP:
        r.election_elapsed = 0
        r.lead = m.frm
        handle_append_entries(r, m)
    elif t is MT.HEARTBEAT:
        r.election_elapsed = 0
        r.lead = m.frm
        handle_heartbeat(r, m)
    elif t is MT.SNAP:
        r.election_elapsed = 0
        r.lead = m.frm
        handle_snapshot(r, m)
    elif t is MT.PROP:
        if r.lead == NONE:
            raise ProposalDropped(DropReason.NO_LEADER, f"term {r.term}")
        if r.disable_proposal_forwarding:
            raise ProposalDropped(DropReason.FORWARDING_DISABLED, f"leader is {r.lead}")
        r.send(Message(MT.PROP, to=r.lead, frm=m.frm, entries=m.entries))
    elif t is MT.READ_INDEX:
        if r.lead == NONE:
            raise ProposalDropped(DropReason.NO_LEADER, f"term {r.term}")
        r.send(Message(MT.READ_INDEX, to=r.lead, frm=m.frm, entries=m.entries))
    elif t is MT.READ_INDEX_RESP:
        if len(m.entries) == 1:
            r.read_states.append(ReadState(m.index, m.entries[0].data))
    elif t is MT.TRANSFER_LEADER:
        if r.lead == NONE:
            raise ProposalDropped(DropReason.NO_LEADER, f"term {r.term}")
        # ``frm`` names the transferee, not the sender (etcd's convention).
        r.msgs.append(Message(MT.TRANSFER_LEADER, to=r.lead, frm=m.frm, term=r.term))
    elif t is MT.TIMEOUT_NOW:
        # The leader asked us to take over: campaign at once, without a pre-vote, with a
        # context that lets voters in a leader lease grant it.
        r.hup("transfer")
    elif t is MT.FORGET_LEADER:
        # An external failure detector says the leader is gone: stop honouring its lease so
        # that pre-votes can be granted now rather than after an election timeout.
        r.lead = NONE


def step_candidate(r: Raft, m: Message) -> None:
    t = m.type
    my_resp = MT.PRE_VOTE_RESP if r.role is Role.PRE_CANDIDATE else MT.VOTE_RESP
    if t is MT.APP:
        r.become_follower(m.term, m.frm)  # a leader exists at a term >= ours
        handle_append_entries(r, m)
    elif t is MT.HEARTBEAT:
        r.become_follower(m.term, m.frm)
        handle_heartbeat(r, m)
    elif t is MT.SNAP:
        r.become_follower(m.term, m.frm)
        handle_snapshot(r, m)
    elif t is my_resp:
        res = r.poll(m.frm, t, not m.reject)
        if res is VoteResult.WON:
            if r.role is Role.PRE_CANDIDATE:
                r.campaign("election")
            else:
                r.become_leader()
                bcast_append(r)
        elif res is VoteResult.LOST:
            # A pre-candidate returns to its term unchanged; a candidate keeps its vote.
            r.become_follower(r.term, NONE)
    elif t in (MT.PROP, MT.READ_INDEX, MT.TRANSFER_LEADER):
        raise ProposalDropped(DropReason.NO_LEADER, f"election in progress at term {r.term}")
    # TIMEOUT_NOW and stale responses are ignored.


def handle_append_entries(r: Raft, m: Message) -> None:
    rlog = r.log
    if m.index < rlog.committed:
        # Everything up to our commit index already matches (it is committed); say so, and
        # the leader continues from there.
        r.send(Message(MT.APP_RESP, to=m.frm, index=rlog.committed))
        return
    last_new = rlog.maybe_append(m.index, m.log_term, m.commit, m.entries)
    if last_new is not None:
        if m.entries:
            r.sync_config()
        r.send(Message(MT.APP_RESP, to=m.frm, index=last_new))
        return
    # Reject with a hint: the largest index <= the probe whose term is <= the probe's term.
    # Entries above it cannot match, so the leader can skip a whole divergent term per round
    # trip instead of one index (etcd's fast back-off).
    hint_index = min(m.index, rlog.last_index())
    hint_index, hint_term = rlog.find_conflict_by_term(hint_index, m.log_term)
    r.send(
        Message(
            MT.APP_RESP,
            to=m.frm,
            index=m.index,
            reject=True,
            reject_hint=hint_index,
            log_term=hint_term,
        )
    )


def handle_heartbeat(r: Raft, m: Message) -> None:
    # The leader caps this at what it knows we match, so this never commits entries we have
    # not been shown to share with the leader.
    r.log.commit_to(m.commit)
    r.send(Message(MT.HEARTBEAT_RESP, to=m.frm, context=m.context))


def handle_snapshot(r: Raft, m: Message) -> None:
    snap = m.snapshot
    if snap is not None and restore(r, snap):
        r.send(Message(MT.APP_RESP, to=m.frm, index=r.log.last_index()))
    else:
        r.send(Message(MT.APP_RESP, to=m.frm, index=r.log.committed))


def restore(r: Raft, snap: Snapshot) -> bool:
    """Install a leader's snapshot unless our log already covers it; True if installed."""
    idx, term = snap.metadata.index, snap.metadata.term
    if idx <= r.log.committed:
        return False
    if r.role is not Role.FOLLOWER:  # pragma: no cover - callers become follower first
        r.become_follower(r.term + 1, NONE)
        return False
    if r.log.match_term(idx, term):
        # Our log already contains the snapshot's last entry, so (log matching) everything
        # before it too: commit up to it instead of throwing our log away.
        r.log.commit_to(idx)
        return False
    r.log.restore(snap)
    r.sync_config()
    return True
