"""The leader's step function: proposals, replication and flow control, commit, ReadIndex,
CheckQuorum and leadership transfer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import quorum
from .confchange import apply_change, decode_conf_change, encode_conf_change
from .errors import (
    DropReason,
    InvariantViolation,
    ProposalDropped,
    SnapshotTemporarilyUnavailable,
    StorageError,
)
from .progress import Progress, ProgressState
from .types import NONE, Entry, EntryType, Message, MessageType, ReadState, payload_size

if TYPE_CHECKING:
    from .raft import Raft

MT = MessageType
PS = ProgressState


def step_leader(r: Raft, m: Message) -> None:
    t = m.type
    if t is MT.BEAT:
        bcast_heartbeat(r, r.read_only.last_pending_ctx())
        return
    if t is MT.CHECK_QUORUM:
        if not r.trk.quorum_active(r.id):
            # We cannot reach a majority: stop claiming leadership (and stop accepting
            # proposals that could never commit) so that the majority side can move on.
            r.become_follower(r.term, NONE)
        for nid, pr in r.trk.progress.items():
            if nid != r.id:
                pr.recent_active = False
        return
    if t is MT.PROP:
        propose(r, m)
        return
    if t is MT.READ_INDEX:
        read_index(r, m)
        return
    if t is MT.FORGET_LEADER:
        return
    pr = r.trk.progress.get(m.frm)
    if pr is None:
        if t is MT.TRANSFER_LEADER:
            raise ProposalDropped(DropReason.TRANSFER_INVALID, f"{m.frm} is not a member")
        return  # a response from a node no longer in the configuration
    if t is MT.APP_RESP:
        handle_append_response(r, m, pr)
    elif t is MT.HEARTBEAT_RESP:
        handle_heartbeat_response(r, m, pr)
    elif t is MT.SNAP_STATUS:
        if pr.state is not PS.SNAPSHOT:
            return
        if m.reject:
            # The snapshot did not make it; probe again from where we last knew it matched.
            pr.pending_snapshot = 0
        pr.become_probe()
        # Wait for a heartbeat response (or the follower's own append response) before the
        # next probe, rather than flooding a follower that may still be busy installing it.
        pr.paused = True
    elif t is MT.UNREACHABLE:
        # Optimistic pipelining is pointless while the transport cannot reach it.
        if pr.state is PS.REPLICATE:
            pr.become_probe()
    elif t is MT.TRANSFER_LEADER:
        transfer_leader(r, m.frm, pr)


def propose(r: Raft, m: Message) -> None:
    if r.id not in r.trk.voters:
        raise ProposalDropped(DropReason.NOT_IN_CONFIG, f"leader {r.id}")
    if r.lead_transferee != NONE:
        raise ProposalDropped(DropReason.TRANSFER_IN_PROGRESS, f"to {r.lead_transferee}")
    ents = m.entries
    if any(e.type == EntryType.CONF_CHANGE for e in ents):
        if len(ents) != 1:
            raise ProposalDropped(DropReason.CONF_CHANGE_INVALID, "one change per proposal")
        rlog = r.log
        if rlog.confs.latest_index > rlog.committed:
            raise ProposalDropped(
                DropReason.CONF_CHANGE_PENDING,
                f"entry {rlog.confs.latest_index} uncommitted (commit {rlog.committed})",
            )
        if rlog.term(rlog.committed) != r.term:
            raise ProposalDropped(DropReason.CONF_CHANGE_TOO_EARLY, f"term {r.term}")
        cc, _ = decode_conf_change(ents[0].data)
        new_cs = apply_change(rlog.conf_state, cc)
        ents = (Entry(0, 0, encode_conf_change(cc, new_cs), EntryType.CONF_CHANGE),)
    r.append_entry(ents)
    bcast_append(r)
    r.maybe_step_down_removed()


def read_index(r: Raft, m: Message) -> None:
    voters = r.trk.voters
    if len(voters) == 1 and r.id in voters:
        # Nobody else can have been elected: our commit index is the read index.
        respond_read_index(r, m, r.log.committed)
        return
    if not committed_entry_in_current_term(r):
        # Until we commit in our term we may not know the true commit index (entries from
        # earlier terms may be committed without our knowing): park the request.
        r.pending_read_index_messages.append(m)
        return
    send_read_index_round(r, m)


def committed_entry_in_current_term(r: Raft) -> bool:
    return r.log.term(r.log.committed) == r.term


def send_read_index_round(r: Raft, m: Message) -> None:
    ctx = m.entries[0].data
    r.read_only.add_request(r.log.committed, m)
    r.read_only.recv_ack(r.id, ctx)
    bcast_heartbeat(r, ctx)


def release_pending_read_index_messages(r: Raft) -> None:
    if not r.pending_read_index_messages or not committed_entry_in_current_term(r):
        return
    pending, r.pending_read_index_messages = r.pending_read_index_messages, []
    for m in pending:
        send_read_index_round(r, m)


def respond_read_index(r: Raft, req: Message, index: int) -> None:
    if req.frm in (NONE, r.id):
        r.read_states.append(ReadState(index, req.entries[0].data))
    else:
        r.send(Message(MT.READ_INDEX_RESP, to=req.frm, index=index, entries=req.entries))


def handle_append_response(r: Raft, m: Message, pr: Progress) -> None:
    pr.recent_active = True
    rlog = r.log
    if m.reject:
        next_probe = m.reject_hint
        if m.log_term > 0:
            # The follower's entry at reject_hint has term log_term; skip our entries with a
            # larger term, none of which can match it.
            next_probe, _ = rlog.find_conflict_by_term(m.reject_hint, m.log_term)
        if pr.maybe_decr_to(m.index, next_probe):
            if pr.state is PS.REPLICATE:
                pr.become_probe()
            send_append(r, m.frm)
        return
    old_paused = pr.is_paused()
    if not (pr.maybe_update(m.index) or (pr.match == m.index and pr.state is PS.PROBE)):
        return  # stale acknowledgement
    if pr.state is PS.PROBE:
        pr.become_replicate()
    elif pr.state is PS.SNAPSHOT and pr.match + 1 >= rlog.first_index():
        # The follower caught up past our compaction point some other way (it installed the
        # snapshot, or an earlier append made it): resume normal replication.
        pr.become_probe()
        pr.become_replicate()
    elif pr.state is PS.REPLICATE:
        pr.inflights.free_le(m.index)
    if r.maybe_commit():
        release_pending_read_index_messages(r)
        bcast_append(r)
    elif old_paused:
        send_append(r, m.frm)
    # Keep the follower's pipeline full.
    while maybe_send_append(r, m.frm, False):
        pass
    if m.frm == r.lead_transferee and pr.match == rlog.last_index():
        send_timeout_now(r, m.frm)
    r.maybe_step_down_removed()


def handle_heartbeat_response(r: Raft, m: Message, pr: Progress) -> None:
    pr.recent_active = True
    pr.paused = False
    if pr.match < r.log.last_index() or pr.state is PS.PROBE:
        send_append(r, m.frm)
    if not m.context:
        return
    acks = r.read_only.recv_ack(m.frm, m.context)
    if acks is None or quorum.vote_result(r.trk.voters, acks) is not quorum.VoteResult.WON:
        return
    for rs in r.read_only.advance(m.context):
        respond_read_index(r, rs.req, rs.index)


def transfer_leader(r: Raft, transferee: int, pr: Progress) -> None:
    if transferee not in r.trk.voters:
        raise ProposalDropped(DropReason.TRANSFER_INVALID, f"{transferee} is not a voter")
    last = r.lead_transferee
    if last != NONE:
        if last == transferee:
            return  # already transferring to it
        r.abort_leader_transfer()
    if transferee == r.id:
        return  # already the leader
    # The transfer must complete within one election timeout or it is abandoned.
    r.election_elapsed = 0
    r.lead_transferee = transferee
    if pr.match == r.log.last_index():
        send_timeout_now(r, transferee)
    else:
        # Catch it up first; TIMEOUT_NOW follows when its append response shows it matches.
        send_append(r, transferee)


def send_timeout_now(r: Raft, to: int) -> None:
    r.send(Message(MT.TIMEOUT_NOW, to=to))


# -- sending ------------------------------------------------------------------------------------
def send_append(r: Raft, to: int) -> None:
    maybe_send_append(r, to, True)


def maybe_send_append(r: Raft, to: int, send_if_empty: bool) -> bool:
    """Send the next append to ``to`` if flow control allows; True if something was sent.

    With ``send_if_empty`` an append without entries is sent too: it carries the commit index,
    and in a full window it is the probe that tells us whether in-flight messages were lost.
    """
    pr = r.trk.progress[to]
    if pr.is_paused():
        return False
    rlog = r.log
    prev_index = pr.next - 1
    try:
        prev_term = rlog.term(prev_index)
    except StorageError:
        # Compacted: the follower needs entries we no longer have.
        return maybe_send_snapshot(r, to, pr)
    ents: list[Entry] = []
    if pr.state is not PS.REPLICATE or not pr.inflights.full():
        try:
            ents = rlog.entries(pr.next, r.max_msg_size)
        except StorageError:
            return maybe_send_snapshot(r, to, pr)
    if not ents and not send_if_empty:
        return False
    r.msgs.append(
        Message(
            MT.APP,
            to=to,
            frm=r.id,
            term=r.term,
            log_term=prev_term,
            index=prev_index,
            entries=tuple(ents),
            commit=rlog.committed,
        )
    )
    pr.sent_entries(len(ents), payload_size(ents))
    return True


def maybe_send_snapshot(r: Raft, to: int, pr: Progress) -> bool:
    if not pr.recent_active:
        # Snapshots are expensive; do not stream them into the void.
        return False
    try:
        snap = r.log.snapshot()
    except SnapshotTemporarilyUnavailable:
        return False
    if snap.metadata.index == 0:
        raise InvariantViolation(f"follower {to} needs a snapshot but there is none")
    pr.become_snapshot(snap.metadata.index)
    r.send(Message(MT.SNAP, to=to, snapshot=snap))
    return True


def bcast_append(r: Raft) -> None:
    for nid in sorted(r.trk.progress):
        if nid != r.id:
            send_append(r, nid)


def bcast_heartbeat(r: Raft, ctx: bytes) -> None:
    committed = r.log.committed
    for nid in sorted(r.trk.progress):
        if nid == r.id:
            continue
        pr = r.trk.progress[nid]
        # Never tell a follower to commit past what it is known to share with us: beyond its
        # match index its log may hold stale entries of an older term.
        r.msgs.append(
            Message(
                MT.HEARTBEAT,
                to=nid,
                frm=r.id,
                term=r.term,
                commit=min(pr.match, committed),
                context=ctx,
            )
        )
