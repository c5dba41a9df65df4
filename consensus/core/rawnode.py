"""The public face of the core: inputs in, ``Ready`` batches out.

The Ready contract
------------------
``ready()`` returns everything that happened since the last batch; the runtime then, in order:

1. **persists** ``snapshot`` (if any), then ``entries`` (writing entry *i* discards any persisted
   entries at *i* or later), then ``hard_state`` (if any) - durably (fsync) when ``must_sync``,
   atomically if it can; then mirrors them into the ``Storage`` the core reads;
2. **sends** ``messages`` - only now, because they may promise what was just persisted (a vote,
   an acknowledged entry). After sending a ``SNAP`` message, call ``report_snapshot``;
3. **applies** the ``snapshot`` and then ``committed_entries`` to the state machine (committed
   entries may be in this very batch's ``entries``: step 1 made them durable first), and serves
   reads whose ``read_states`` index is now applied;
4. calls ``advance(ready)``.

Between ``ready()`` and ``advance()`` the core may keep stepping messages, ticking and taking
proposals (the runtime can fsync one batch while the next accumulates: group commit). Only one
``Ready`` may be outstanding: ``ready()`` refuses to hand out another before ``advance()``.

A restarted node is rebuilt from the durable state: a ``Storage`` holding the last snapshot, the
entries after it and the hard state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .confchange import ConfChange, encode_conf_change
from .config import Config
from .errors import ProposalDropped
from .progress import ProgressState
from .raft import Raft
from .storage import SnapshotStorage, Storage
from .types import (
    LOCAL_MESSAGES,
    NONE,
    RESPONSE_MESSAGES,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Role,
    Snapshot,
    SnapshotMetadata,
    SoftState,
)

MT = MessageType


@dataclass(frozen=True, slots=True)
class Ready:
    soft_state: SoftState | None
    """Set when leader or role changed; volatile, for the runtime's information."""
    hard_state: HardState | None
    """Set when term, vote or commit changed: persist it."""
    read_states: tuple[ReadState, ...]
    entries: tuple[Entry, ...]
    """Persist before sending ``messages``."""
    snapshot: Snapshot | None
    """A snapshot received from the leader: persist it, then restore the state machine."""
    committed_entries: tuple[Entry, ...]
    """Apply in order, after persisting."""
    messages: tuple[Message, ...]
    """Send only after persisting."""
    must_sync: bool
    """Whether the writes must be durable (fsync) before sending: true when term, vote or
    entries changed. A commit-index-only change may be written lazily."""

    def contains_updates(self) -> bool:
        return bool(
            self.soft_state
            or self.hard_state
            or self.read_states
            or self.entries
            or self.snapshot
            or self.committed_entries
            or self.messages
        )


@dataclass(frozen=True, slots=True)
class ProgressView:
    match: int
    next: int
    state: ProgressState
    learner: bool
    recent_active: bool


@dataclass(frozen=True, slots=True)
class Status:
    id: int
    term: int
    vote: int
    commit: int
    applied: int
    lead: int
    role: Role
    conf_state: ConfState
    last_index: int
    lead_transferee: int
    progress: dict[int, ProgressView] = field(default_factory=dict)
    """Followers' progress; only filled in on the leader."""


class RawNode:
    """A synchronous, thread-unsafe Raft member. One owner calls every method."""

    def __init__(self, cfg: Config, storage: Storage) -> None:
        self.raft = Raft(cfg, storage)
        self._storage = storage
        self._prev_soft = self.raft.soft_state()
        self._prev_hard = storage.initial_state()
        self._outstanding = False

    @property
    def id(self) -> int:
        return self.raft.id

    # -- inputs -----------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance the logical clock by one tick (the runtime calls this every tick interval)."""
        self.raft.tick()

    def campaign(self) -> None:
        """Start an election now (a pre-election first when PreVote is on)."""
        self.raft.step(Message(MT.HUP, frm=self.raft.id))

    def step(self, m: Message) -> None:
        """Feed a message received from a peer.

        Local-only message types are refused. Responses from nodes outside the configuration are
        ignored. A forwarded proposal or read that the leader must refuse is dropped here and
        counted in ``raft.dropped_forwarded``: the follower that forwarded it was already told
        "forwarded", so its caller must wait for the result with a deadline anyway.
        """
        if m.type in LOCAL_MESSAGES:
            raise ValueError(f"{m.type.name} is a local message and cannot come from a peer")
        r = self.raft
        if m.type in RESPONSE_MESSAGES and m.frm not in r.trk.progress:
            return
        try:
            r.step(m)
        except ProposalDropped:
            # A forwarded request (possibly forwarded twice, by a deposed leader) that cannot
            # be served here; nobody is waiting on this call for the answer.
            r.dropped_forwarded += 1

    def propose(self, data: bytes) -> None:
        """Append ``data`` to the log (at the leader; forwarded from a follower).

        Raises ``ProposalDropped`` with the reason when it cannot be accepted. Acceptance is not
        commitment: the proposal is committed once it shows up in ``committed_entries``.
        """
        r = self.raft
        r.step(Message(MT.PROP, frm=r.id, entries=(Entry(0, 0, data),)))

    def propose_conf_change(self, cc: ConfChange) -> None:
        """Propose one membership change (see ``confchange`` for the rules)."""
        r = self.raft
        data = encode_conf_change(cc)
        r.step(Message(MT.PROP, frm=r.id, entries=(Entry(0, 0, data, EntryType.CONF_CHANGE),)))

    def read_index(self, ctx: bytes) -> None:
        """Request a linearizable read; answered by a ``ReadState`` with the same ``ctx``.

        ``ctx`` must be unique among outstanding requests. Requests can be lost when leadership
        changes; retry after a deadline.
        """
        r = self.raft
        r.step(Message(MT.READ_INDEX, frm=r.id, entries=(Entry(0, 0, ctx),)))

    def transfer_leader(self, transferee: int) -> None:
        """Ask the leader to hand leadership to ``transferee`` (a voter).

        Proposals are refused while it is in progress; it is abandoned after one election
        timeout.
        """
        self.raft.step(Message(MT.TRANSFER_LEADER, frm=transferee))

    def forget_leader(self) -> None:
        """A follower forgets its leader (an external detector says it is dead), so it can grant
        pre-votes at once instead of waiting out the leader's lease."""
        self.raft.step(Message(MT.FORGET_LEADER))

    def report_unreachable(self, nid: int) -> None:
        """The transport failed to send to ``nid``; stop pipelining to it."""
        self.raft.step(Message(MT.UNREACHABLE, frm=nid))

    def report_snapshot(self, nid: int, ok: bool) -> None:
        """Whether the snapshot sent to ``nid`` got through."""
        self.raft.step(Message(MT.SNAP_STATUS, frm=nid, reject=not ok))

    def compact(self, index: int, data: bytes) -> Snapshot:
        """Snapshot the state machine at ``index`` (which must be applied) and compact the log.

        ``data`` is the state machine's state after applying ``index``. The configuration stored
        with it is the one the log establishes at ``index``. The storage given to the constructor
        must implement ``SnapshotStorage`` (``MemoryStorage`` does). Returns the snapshot, which
        the runtime must persist before deleting the compacted entries from disk.
        """
        r = self.raft
        if index > r.log.applied:
            raise ValueError(f"cannot snapshot at {index}: only {r.log.applied} is applied")
        storage = self._storage
        if not isinstance(storage, SnapshotStorage):
            raise TypeError(f"{type(storage).__name__} cannot create snapshots")
        snap = storage.create_snapshot(index, r.log.confs.at(index), data)
        storage.compact(index)
        r.log.confs.compact_to(index)
        return snap

    def snapshot_metadata(self, index: int) -> SnapshotMetadata:
        """What a snapshot of the state machine at ``index`` (applied) records: for a runtime
        that persists a snapshot itself, off its loop, rather than through ``compact``; it then
        tells the core with ``compacted``."""
        r = self.raft
        if index > r.log.applied:
            raise ValueError(f"cannot snapshot at {index}: only {r.log.applied} is applied")
        return SnapshotMetadata(index, self._storage.term(index), r.log.confs.at(index))

    def compacted(self, index: int) -> None:
        """The runtime's storage now starts with a snapshot at ``index`` (see
        ``snapshot_metadata``): history before it is dropped."""
        self.raft.log.confs.compact_to(index)

    # -- outputs ----------------------------------------------------------------------------
    def take_messages(self, types: frozenset[MessageType]) -> list[Message]:
        """Take the pending messages of ``types`` out of the next ``Ready`` (they will not be in
        it). Only for messages that promise nothing durable -- heartbeats and their responses
        (etcd sends everything but append and vote responses before persisting): a runtime whose
        persistence of the outstanding ``Ready`` is stalled (a full disk) still answers the
        leader's heartbeats with them."""
        r = self.raft
        taken = [m for m in r.msgs if m.type in types]
        if taken:
            r.msgs = [m for m in r.msgs if m.type not in types]
        return taken

    def has_ready(self) -> bool:
        if self._outstanding:
            return False
        r = self.raft
        rlog = r.log
        if r.msgs or r.read_states:
            return True
        if rlog.unstable.offset_in_progress < rlog.unstable.offset + len(rlog.unstable.entries):
            return True
        if rlog.unstable.snapshot is not None and not rlog.unstable.snapshot_in_progress:
            return True
        if rlog.has_next_committed_entries():
            return True
        if r.lead != self._prev_soft.lead or r.role is not self._prev_soft.role:
            return True
        return r.hard_state() != self._prev_hard

    def ready(self) -> Ready:
        if self._outstanding:
            raise RuntimeError("advance() the previous Ready before asking for another")
        r = self.raft
        rlog = r.log
        soft = r.soft_state()
        hard = r.hard_state()
        entries = tuple(rlog.unstable.next_entries())
        snap = rlog.unstable.next_snapshot()
        committed = tuple(rlog.next_committed_entries())
        ph = self._prev_hard
        rd = Ready(
            soft_state=soft if soft != self._prev_soft else None,
            hard_state=hard if hard != ph else None,
            read_states=tuple(r.read_states),
            entries=entries,
            snapshot=snap,
            committed_entries=committed,
            messages=tuple(r.msgs),
            must_sync=bool(entries)
            or snap is not None
            or hard.term != ph.term
            or hard.vote != ph.vote,
        )
        # Accept the batch: it is the runtime's now.
        r.msgs = []
        r.read_states = []
        self._prev_soft = soft
        self._prev_hard = hard
        rlog.unstable.accept_in_progress()
        if committed:
            rlog.applying = committed[-1].index
        self._outstanding = True
        return rd

    def advance(self, rd: Ready) -> None:
        """The runtime finished persisting, sending and applying ``rd``."""
        if not self._outstanding:
            raise RuntimeError("advance() without an outstanding Ready")
        r = self.raft
        rlog = r.log
        if rd.entries:
            last = rd.entries[-1]
            rlog.stable_to(last.index, last.term)
        if rd.snapshot is not None:
            rlog.stable_snap_to(rd.snapshot.metadata.index)
            if rd.snapshot.metadata.index > rlog.applied:
                rlog.applied_to(rd.snapshot.metadata.index)
        if rd.committed_entries:
            rlog.applied_to(rd.committed_entries[-1].index)
            r.reduce_uncommitted_size(rd.committed_entries)
        self._outstanding = False

    def status(self) -> Status:
        r = self.raft
        progress: dict[int, ProgressView] = {}
        if r.role is Role.LEADER:
            for nid, pr in sorted(r.trk.progress.items()):
                progress[nid] = ProgressView(
                    pr.match, pr.next, pr.state, pr.is_learner, pr.recent_active
                )
        return Status(
            id=r.id,
            term=r.term,
            vote=r.vote,
            commit=r.log.committed,
            applied=r.log.applied,
            lead=r.lead,
            role=r.role,
            conf_state=r.log.conf_state,
            last_index=r.log.last_index(),
            lead_transferee=r.lead_transferee,
            progress=progress,
        )

    def is_leader(self) -> bool:
        return self.raft.role is Role.LEADER and self.raft.lead == self.raft.id != NONE
