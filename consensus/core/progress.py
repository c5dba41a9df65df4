"""The leader's view of each follower: how far it matches, what to send next, and flow control.

A follower's progress is in one of three states (etcd-io/raft ``design.md``):

* ``PROBE``: the leader does not know where the follower's log ends; it sends at most one append
  per heartbeat interval and lowers ``next`` on each rejection (by whole terms, using the
  follower's reject hint) until one is accepted.
* ``REPLICATE``: appends are pipelined optimistically (``next`` advances as they are sent) inside
  an in-flight window bounded by message count and bytes.
* ``SNAPSHOT``: the follower needs entries that were compacted away; appends stop until the
  snapshot is reported sent or the follower answers from its new position.
"""

from __future__ import annotations

import enum
from collections import deque

from . import quorum
from .types import ConfState


class ProgressState(enum.IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


class Inflights:
    """A sliding window of append messages in flight, bounded by count and total bytes.

    Each entry is (last index carried by the message, payload bytes). Acknowledgements free every
    message up to the acknowledged index, in order.
    """

    __slots__ = ("_q", "bytes", "max_count", "max_bytes")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self._q: deque[tuple[int, int]] = deque()
        self.bytes = 0
        self.max_count = max_count
        self.max_bytes = max_bytes

    def add(self, index: int, size: int) -> None:
        if self._q and index <= self._q[-1][0]:
            raise AssertionError(f"inflight index {index} not increasing")
        self._q.append((index, size))
        self.bytes += size

    def free_le(self, index: int) -> None:
        q = self._q
        while q and q[0][0] <= index:
            self.bytes -= q.popleft()[1]

    def full(self) -> bool:
        return len(self._q) >= self.max_count or (
            self.max_bytes > 0 and self.bytes >= self.max_bytes
        )

    def count(self) -> int:
        return len(self._q)

    def reset(self) -> None:
        self._q.clear()
        self.bytes = 0


class Progress:
    __slots__ = (
        "match",
        "next",
        "state",
        "pending_snapshot",
        "recent_active",
        "paused",
        "inflights",
        "is_learner",
    )

    def __init__(self, next_index: int, inflights: Inflights, is_learner: bool) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.pending_snapshot = 0
        # A new member starts active: it must not be cut off from snapshots (which go only to
        # active followers) before it had a chance to answer.
        self.recent_active = True
        # In PROBE: one append per heartbeat interval was already sent. In REPLICATE: the
        # in-flight window is full.
        self.paused = False
        self.inflights = inflights
        self.is_learner = is_learner

    def reset_state(self, state: ProgressState) -> None:
        self.paused = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            # The snapshot was reported sent: probe from just after it.
            pending = self.pending_snapshot
            self.reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self.reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self.reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self.reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def sent_entries(self, count: int, size: int) -> None:
        if self.state == ProgressState.REPLICATE:
            if count > 0:
                self.next += count
                self.inflights.add(self.next - 1, size)
            self.paused = self.inflights.full()
        elif self.state == ProgressState.PROBE:
            # One probe per heartbeat interval: wait for an answer or the next heartbeat.
            self.paused = True

    def maybe_update(self, n: int) -> bool:
        """Record an acknowledgement of index ``n``; False if it is stale."""
        updated = False
        if self.match < n:
            self.match = n
            updated = True
            self.paused = False
        self.next = max(self.next, n + 1)
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """Lower ``next`` after a rejection of the append at ``rejected``; False if stale."""
        if self.state == ProgressState.REPLICATE:
            # Rejections of indexes already matched come from reordered or duplicated messages.
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        # In PROBE only one append is outstanding, so a genuine rejection is of next - 1.
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.paused = False
        return True

    def is_paused(self) -> bool:
        if self.state == ProgressState.SNAPSHOT:
            return True
        return self.paused

    def __repr__(self) -> str:
        s = f"{self.state.name} match={self.match} next={self.next}"
        if self.is_learner:
            s += " learner"
        if self.is_paused():
            s += " paused"
        if self.pending_snapshot:
            s += f" pending_snap={self.pending_snapshot}"
        if not self.recent_active:
            s += " inactive"
        if self.inflights.count():
            s += f" inflight={self.inflights.count()}"
        return s


class ProgressTracker:
    """The configuration a node currently uses, the leader's per-member progress, and votes."""

    __slots__ = ("voters", "learners", "progress", "votes", "max_inflight", "max_inflight_bytes")

    def __init__(self, max_inflight: int, max_inflight_bytes: int) -> None:
        self.voters: frozenset[int] = frozenset()
        self.learners: frozenset[int] = frozenset()
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes

    def set_config(self, cs: ConfState, next_index: int) -> None:
        """Adopt ``cs``: new members get a fresh progress, departed ones lose theirs."""
        self.voters = cs.voters
        self.learners = cs.learners
        members = cs.voters | cs.learners
        for nid in list(self.progress):
            if nid not in members:
                del self.progress[nid]
        for nid in members:
            pr = self.progress.get(nid)
            if pr is None:
                self.progress[nid] = Progress(
                    next_index,
                    Inflights(self.max_inflight, self.max_inflight_bytes),
                    nid in cs.learners,
                )
            else:
                pr.is_learner = nid in cs.learners

    def reset_progress(self, self_id: int, last_index: int) -> None:
        """Forget everything known about followers (a new term begins)."""
        for nid, pr in self.progress.items():
            pr.reset_state(ProgressState.PROBE)
            pr.match = 0
            pr.next = last_index + 1
            pr.recent_active = True
            if nid == self_id:
                pr.match = last_index

    def committed(self) -> int:
        prs = self.progress
        return quorum.committed_index(
            self.voters, {v: prs[v].match for v in self.voters if v in prs}
        )

    def quorum_active(self, self_id: int) -> bool:
        active = {nid for nid, pr in self.progress.items() if nid == self_id or pr.recent_active}
        return quorum.quorum_active(self.voters, active)

    def reset_votes(self) -> None:
        self.votes = {}

    def record_vote(self, nid: int, granted: bool) -> None:
        self.votes.setdefault(nid, granted)

    def tally(self) -> quorum.VoteResult:
        return quorum.vote_result(self.voters, self.votes)
