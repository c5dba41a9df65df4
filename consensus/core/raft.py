"""The Raft state machine: terms, roles, elections and the dispatch of every input.

One object, no I/O, no clock, no randomness except the injected RNG. Inputs are ``tick()`` and
``step(message)``; outputs accumulate in ``msgs`` and ``read_states`` and in the log, and
``RawNode`` turns them into ``Ready`` batches. Role behaviour is one step function per role
(``follower.step_follower``, ``follower.step_candidate``, ``leader.step_leader``), chosen by the
``become_*`` transitions, as in etcd-io/raft.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Literal

from . import follower, leader
from .config import Config
from .errors import DropReason, InvariantViolation, ProposalDropped
from .log import RaftLog
from .progress import ProgressTracker
from .quorum import VoteResult
from .readonly import ReadOnly
from .storage import Storage
from .types import (
    NONE,
    ConfState,
    Entry,
    HardState,
    Message,
    MessageType,
    ReadState,
    Role,
    SoftState,
    payload_size,
)

log = logging.getLogger(__name__)

CampaignType = Literal["pre-election", "election", "transfer"]
CAMPAIGN_TRANSFER = b"CampaignTransfer"
"""Context of the vote requests of a leadership-transfer election: voters in a leader lease let
it through, since the current leader itself asked for it."""

MT = MessageType


class Raft:
    def __init__(self, cfg: Config, storage: Storage) -> None:
        cfg.validate()
        self.id = cfg.id
        self.log = RaftLog(storage, cfg.max_committed_size_per_ready)
        self.term = 0
        self.vote = NONE
        self.max_msg_size = cfg.max_size_per_msg
        self.max_uncommitted_size = cfg.max_uncommitted_entries_size
        self.trk = ProgressTracker(cfg.max_inflight_msgs, cfg.max_inflight_bytes)
        self.role = Role.FOLLOWER
        self.lead = NONE
        self.lead_transferee = NONE
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self.read_only = ReadOnly()
        self.pending_read_index_messages: list[Message] = []
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.check_quorum = cfg.check_quorum
        self.pre_vote = cfg.pre_vote
        self.heartbeat_timeout = cfg.heartbeat_tick
        self.election_timeout = cfg.election_tick
        self.randomized_election_timeout = cfg.election_tick
        self.disable_proposal_forwarding = cfg.disable_proposal_forwarding
        self.rng = cfg.rng if cfg.rng is not None else random.Random(cfg.id)
        self.uncommitted_size = 0
        self.dropped_forwarded = 0
        self._conf: ConfState | None = None
        self._step: Callable[[Raft, Message], None] = follower.step_follower
        self._tick: Callable[[], None] = self.tick_election

        hs = storage.initial_state()
        if hs.commit > self.log.last_index():
            raise InvariantViolation(
                f"hard state commit {hs.commit} is beyond the last log index "
                f"{self.log.last_index()}: storage is corrupt or lost a synced write"
            )
        self.term = hs.term
        self.vote = hs.vote
        self.log.committed = max(self.log.committed, hs.commit)
        if cfg.applied:
            self.log.applied_to(cfg.applied)
        self.sync_config()
        self.become_follower(self.term, NONE)
        log.info(
            "raft start id=%d term=%d commit=%d last=%d conf=%s",
            self.id,
            self.term,
            self.log.committed,
            self.log.last_index(),
            sorted(self.trk.voters),
        )

    # -- state snapshots -------------------------------------------------------------------
    def soft_state(self) -> SoftState:
        return SoftState(self.lead, self.role)

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    # -- configuration ----------------------------------------------------------------------
    def sync_config(self) -> None:
        """Adopt the configuration at the end of the log, if it changed."""
        cs = self.log.conf_state
        if cs is self._conf:
            return
        self._conf = cs
        self.trk.set_config(cs, self.log.last_index() + 1)
        if self.role is Role.LEADER:
            if self.lead_transferee != NONE and self.lead_transferee not in cs.voters:
                self.abort_leader_transfer()
            # A departed voter may have been the one holding the commit index back.
            if self.maybe_commit():
                leader.bcast_append(self)

    def promotable(self) -> bool:
        """Whether this node may campaign: it is a voter and is not installing a snapshot."""
        return self.id in self.trk.voters and not self.log.has_next_or_in_progress_snapshot()

    # -- transitions ------------------------------------------------------------------------
    def reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = NONE
            self.drop_stale_acks()
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.reset_randomized_election_timeout()
        self.abort_leader_transfer()
        self.trk.reset_votes()
        self.trk.reset_progress(self.id, self.log.last_index())
        self.uncommitted_size = 0
        self.read_only = ReadOnly()
        # Reads parked until this leader commits in its term cannot be answered by a
        # non-leader; the runtime times them out and retries.
        self.pending_read_index_messages = []

    def drop_stale_acks(self) -> None:
        """Discard queued append acknowledgements of earlier terms.

        An acknowledgement queued in ``msgs`` covers entries that are only in the unstable log:
        they will be persisted by the next Ready, which is what makes sending it then safe. But a
        leader of the new term may truncate those entries before that Ready is formed; the ack
        would then go out for entries this node never persists, and a leader still in the old
        term could count it toward a commit. Within one term no truncation can happen (a leader
        never rewrites its own entries), so dropping the old term's acks on a term change closes
        the window. The sender retries; nothing is lost but a message. (Found by the simulator:
        the checker's "unpersisted-ack" invariant.)
        """
        msgs = self.msgs
        if msgs:
            term = self.term
            self.msgs = [
                m for m in msgs if not (m.type is MT.APP_RESP and not m.reject and m.term < term)
            ]

    def reset_randomized_election_timeout(self) -> None:
        # Uniform in [ET, 2ET): staggered timeouts make split votes rare (§5.2).
        self.randomized_election_timeout = self.election_timeout + self.rng.randrange(
            self.election_timeout
        )

    def become_follower(self, term: int, lead: int) -> None:
        self._step = follower.step_follower
        self.reset(term)
        self._tick = self.tick_election
        self.lead = lead
        self.role = Role.FOLLOWER

    def become_pre_candidate(self) -> None:
        if self.role is Role.LEADER:
            raise InvariantViolation("leader cannot become pre-candidate")
        # A pre-election changes neither term nor vote: that is its whole point.
        self._step = follower.step_candidate
        self.trk.reset_votes()
        self._tick = self.tick_election
        self.lead = NONE
        self.role = Role.PRE_CANDIDATE

    def become_candidate(self) -> None:
        if self.role is Role.LEADER:
            raise InvariantViolation("leader cannot become candidate")
        self._step = follower.step_candidate
        self.reset(self.term + 1)
        self._tick = self.tick_election
        self.vote = self.id
        self.role = Role.CANDIDATE

    def become_leader(self) -> None:
        if self.role is Role.FOLLOWER:
            raise InvariantViolation("follower cannot become leader without an election")
        self._step = leader.step_leader
        self.reset(self.term)
        self._tick = self.tick_heartbeat
        self.lead = self.id
        self.role = Role.LEADER
        pr = self.trk.progress.get(self.id)
        if pr is not None:
            pr.become_replicate()
            pr.recent_active = True
        # An empty entry of the new term: committing it commits everything before it, which
        # is the only way to commit earlier terms' entries (§5.4.2), and it unblocks reads and
        # membership changes, which wait for a commit in the current term.
        self.append_entry((Entry(0, 0),))
        log.info("became leader id=%d term=%d last=%d", self.id, self.term, self.log.last_index())

    # -- ticks --------------------------------------------------------------------------------
    def tick(self) -> None:
        self._tick()

    def tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable() and self.election_elapsed >= self.randomized_election_timeout:
            self.election_elapsed = 0
            self.step(Message(MT.HUP, frm=self.id))

    def tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.election_timeout:
            self.election_elapsed = 0
            if self.check_quorum:
                self.step(Message(MT.CHECK_QUORUM, frm=self.id))
            # A transfer that did not finish in one election timeout is abandoned, so the
            # leader accepts proposals again.
            if self.role is Role.LEADER and self.lead_transferee != NONE:
                self.abort_leader_transfer()
        if self.role is not Role.LEADER:
            return
        if self.heartbeat_elapsed >= self.heartbeat_timeout:
            self.heartbeat_elapsed = 0
            self.step(Message(MT.BEAT, frm=self.id))

    # -- step ---------------------------------------------------------------------------------
    def step(self, m: Message) -> None:
        t = m.type
        if m.term == 0:
            pass  # local message, or a proposal/read forwarded by a follower
        elif m.term > self.term:
            if t is MT.VOTE or t is MT.PRE_VOTE:
                force = m.context == CAMPAIGN_TRANSFER
                in_lease = (
                    self.check_quorum
                    and self.lead != NONE
                    and self.election_elapsed < self.election_timeout
                )
                if not force and in_lease:
                    # We heard from a leader within the minimum election timeout: this
                    # candidate is disruptive (partitioned, or removed), ignore it (§4.2.3).
                    return
            if t is MT.PRE_VOTE:
                pass  # never change our term for a pre-vote
            elif t is MT.PRE_VOTE_RESP and not m.reject:
                pass  # the candidate's future term; we bump it only on winning
            elif t is MT.APP or t is MT.HEARTBEAT or t is MT.SNAP:
                self.become_follower(m.term, m.frm)
            elif t is MT.VOTE:
                # Adopt the term, but keep the election timer running: only hearing from a
                # leader or granting a vote resets it (Raft paper, Figure 2). Otherwise a node
                # whose log is too old to ever win (without PreVote) keeps resetting every
                # up-to-date node by campaigning, and no election can succeed.
                elapsed = self.election_elapsed
                self.become_follower(m.term, NONE)
                self.election_elapsed = elapsed
            else:
                self.become_follower(m.term, NONE)
        elif m.term < self.term:
            if (self.check_quorum or self.pre_vote) and (t is MT.HEARTBEAT or t is MT.APP):
                # A stale leader (perhaps one whose term we overtook while it was cut off):
                # answer at our term so it steps down and a fresh election can include us.
                self.send(Message(MT.APP_RESP, to=m.frm))
            elif t is MT.PRE_VOTE:
                # Reject explicitly; dropping could deadlock a cluster where this candidate
                # has the longer log but a lower term.
                self.send(Message(MT.PRE_VOTE_RESP, to=m.frm, term=self.term, reject=True))
            return

        if t is MT.HUP:
            self.hup("pre-election" if self.pre_vote else "election")
        elif t is MT.VOTE or t is MT.PRE_VOTE:
            self.handle_vote_request(m)
        else:
            self._step(self, m)

    def handle_vote_request(self, m: Message) -> None:
        resp = MT.VOTE_RESP if m.type is MT.VOTE else MT.PRE_VOTE_RESP
        can_vote = (
            self.vote == m.frm  # a repeat of the vote we already cast
            or (self.vote == NONE and self.lead == NONE)  # no vote, no known leader this term
            or (m.type is MT.PRE_VOTE and m.term > self.term)  # a pre-vote for a future term
        )
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # Learners answer too: the candidate's newer configuration may make them voters.
            self.send(Message(resp, to=m.frm, term=m.term))
            if m.type is MT.VOTE:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self.send(Message(resp, to=m.frm, term=self.term, reject=True))

    def hup(self, t: CampaignType) -> None:
        if self.role is Role.LEADER:
            return
        if not self.promotable():
            return
        self.campaign(t)

    def campaign(self, t: CampaignType) -> None:
        if t == "pre-election":
            self.become_pre_candidate()
            vote_type = MT.PRE_VOTE
            term = self.term + 1  # the term we would run for; ours stays unchanged
        else:
            self.become_candidate()
            vote_type = MT.VOTE
            term = self.term
        resp = MT.PRE_VOTE_RESP if vote_type is MT.PRE_VOTE else MT.VOTE_RESP
        if self.poll(self.id, resp, True) is VoteResult.WON:
            # A single-voter configuration wins at once.
            if t == "pre-election":
                self.campaign("election")
            else:
                self.become_leader()
            return
        last_index = self.log.last_index()
        last_term = self.log.term(last_index)
        ctx = CAMPAIGN_TRANSFER if t == "transfer" else b""
        for nid in sorted(self.trk.voters):
            if nid == self.id:
                continue
            self.send(
                Message(
                    vote_type, to=nid, term=term, log_term=last_term, index=last_index, context=ctx
                )
            )

    def poll(self, nid: int, t: MessageType, granted: bool) -> VoteResult:
        self.trk.record_vote(nid, granted)
        return self.trk.tally()

    # -- output -------------------------------------------------------------------------------
    def send(self, m: Message) -> None:
        """Queue ``m`` for the next Ready, stamping sender and (where it is ours) the term."""
        t = m.type
        if t in (MT.VOTE, MT.VOTE_RESP, MT.PRE_VOTE, MT.PRE_VOTE_RESP):
            if m.term == 0:
                raise InvariantViolation(f"{t.name} must carry an explicit term")
            self.msgs.append(_with(m, frm=self.id))
        elif t is MT.PROP or t is MT.READ_INDEX:
            # Forwarded requests carry no term: the leader treats them as local ones.
            self.msgs.append(m)
        else:
            self.msgs.append(_with(m, frm=self.id, term=self.term))

    # -- leader helpers used by several roles ----------------------------------------------
    def append_entry(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        li = self.log.last_index()
        ents = [Entry(self.term, li + 1 + i, e.data, e.type) for i, e in enumerate(entries)]
        if not self.increase_uncommitted_size(ents):
            raise ProposalDropped(
                DropReason.UNCOMMITTED_LIMIT,
                f"{self.uncommitted_size} bytes uncommitted, limit {self.max_uncommitted_size}",
            )
        li = self.log.append(ents)
        pr = self.trk.progress.get(self.id)
        if pr is not None:
            # Our own copy counts as soon as it is appended: no message acknowledging these
            # entries can come back before the Ready carrying them has been persisted.
            pr.maybe_update(li)
        self.sync_config()
        self.maybe_commit()

    def maybe_commit(self) -> bool:
        return self.log.maybe_commit(self.trk.committed(), self.term)

    def increase_uncommitted_size(self, ents: list[Entry]) -> bool:
        s = payload_size(ents)
        limit = self.max_uncommitted_size
        # Always admit one proposal into an empty tail, however large, or it could never pass.
        if limit and self.uncommitted_size > 0 and s > 0 and self.uncommitted_size + s > limit:
            return False
        self.uncommitted_size += s
        return True

    def reduce_uncommitted_size(self, ents: tuple[Entry, ...] | list[Entry]) -> None:
        self.uncommitted_size = max(0, self.uncommitted_size - payload_size(ents))

    def abort_leader_transfer(self) -> None:
        self.lead_transferee = NONE

    def maybe_step_down_removed(self) -> None:
        """A leader that is no longer a voter leads until its removal commits, then steps down
        (thesis §4.2.2): until then it is still needed to commit the change itself."""
        if (
            self.role is Role.LEADER
            and self.id not in self.trk.voters
            and self.log.committed >= self.log.confs.latest_index
        ):
            log.info("leader id=%d steps down: removed from the configuration", self.id)
            self.become_follower(self.term, NONE)


def _with(m: Message, **changes: object) -> Message:
    """``dataclasses.replace`` without its per-call field introspection (hot path)."""
    return Message(
        m.type,
        changes.get("to", m.to),  # type: ignore[arg-type]
        changes.get("frm", m.frm),  # type: ignore[arg-type]
        changes.get("term", m.term),  # type: ignore[arg-type]
        m.log_term,
        m.index,
        m.entries,
        m.commit,
        m.snapshot,
        m.reject,
        m.reject_hint,
        m.context,
    )
