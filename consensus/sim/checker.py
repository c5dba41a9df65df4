"""Safety invariants, checked as the simulation runs.

Each check runs where the state it guards changes, inside the event that changes it, and the
cheap per-node ones run after every event; a violation stops the run at the first event that
shows it. What is checked (reference §F.7):

* **election safety**: at most one leader per term, across all nodes and restarts;
* **log matching**: two logs holding an entry with the same index and term hold the same entry
  and the same term just before it (so, by induction, identical prefixes);
* **leader completeness**: a new leader's log holds every entry known to be committed;
* **commit agreement**: no two nodes ever commit different entries at one index;
* **state machine safety**: every node applies the same entry at each index, and a snapshot
  restores exactly the state the others had at its index;
* **commit monotonic**: a node's commit index never decreases while it runs, and after a restart
  it starts at least at its durable commit; applied never exceeds committed;
* **durable term and vote**: they never regress, a term's vote never changes, and nothing leaves a
  node before the state it depends on is durable (no vote granted, term announced, or entry
  acknowledged ahead of the disk);
* **linearizable reads**: a ReadIndex answer is at least the commit index known anywhere when the
  read was issued (every write completed before the read started is visible to it).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from consensus.core import NONE, Entry, HardState, Message, MessageType, ReadState, Role, Snapshot

if TYPE_CHECKING:
    from .node import SimNode

MT = MessageType


class Violation(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}")


class Checker:
    def __init__(self) -> None:
        self.leaders: dict[int, int] = {}  # term -> leader id
        self.entries: dict[tuple[int, int], tuple[bytes, int, int]] = {}
        # index -> (term, data) of entries known to be committed
        self.committed: dict[int, tuple[int, bytes]] = {}
        # index -> the lowest term in which some node knew the entry committed
        self.commit_terms: dict[int, int] = {}
        self.max_commit = 0
        # index -> (term, data, state chain after applying it)
        self.applied: dict[int, tuple[int, bytes, int]] = {}
        self.votes: dict[tuple[int, int], int] = {}  # (node, term) -> candidate granted
        self.acked: dict[bytes, int] = {}  # proposal payload -> index where it was applied

    # -- after every event ----------------------------------------------------------------------
    def after_event(self, n: SimNode) -> None:
        rn = n.rn
        if rn is None:
            return
        r = rn.raft
        if r.role is Role.LEADER and n.led_term != r.term:
            self._new_leader(n)
        c = r.log.committed
        if c != n.last_commit:
            if c < n.last_commit:
                raise Violation(
                    "commit-regressed", f"n{n.id} commit {n.last_commit} -> {c} while running"
                )
            self._committed(n, n.last_commit, c)
            n.last_commit = c
        if r.log.applied > c:
            raise Violation("applied-beyond-commit", f"n{n.id} applied {r.log.applied} > {c}")

    def _new_leader(self, n: SimNode) -> None:
        r = n.rn.raft  # type: ignore[union-attr]
        prev = self.leaders.setdefault(r.term, n.id)
        if prev != n.id:
            raise Violation("two-leaders", f"n{prev} and n{n.id} both lead term {r.term}")
        n.led_term = r.term
        # Leader completeness: every entry known committed must be in the new leader's log.
        rlog = r.log
        first = rlog.first_index()
        snap = rlog.snapshot().metadata
        for i in range(1, self.max_commit + 1):
            want = self.committed.get(i)
            # Only entries committed in an earlier term must be here: a late leader of an old
            # term (one whose votes were delayed) need not hold what later terms committed.
            if want is None or self.commit_terms[i] >= r.term:
                continue
            if i < first - 1:
                continue  # covered by the snapshot check below
            try:
                t = rlog.term(i)
            except Exception:
                t = -1
            if t != want[0]:
                raise Violation(
                    "leader-completeness",
                    f"n{n.id} leads term {r.term} but has term {t} at committed index {i} "
                    f"(committed term {want[0]})",
                )
        want = self.committed.get(snap.index)
        if (
            snap.index
            and want is not None
            and self.commit_terms[snap.index] < r.term
            and want[0] != snap.term
        ):
            raise Violation(
                "leader-completeness", f"n{n.id} snapshot {snap.index}/{snap.term} vs {want}"
            )

    def _committed(self, n: SimNode, old: int, new: int) -> None:
        r = n.rn.raft  # type: ignore[union-attr]
        rlog = r.log
        lo = max(old + 1, rlog.first_index())
        terms = self.commit_terms
        if lo <= new:
            for e in rlog.slice(lo, new + 1, 1 << 62):
                # The node learned of this commit in its current term, so it was decided in
                # that term or earlier: an upper bound of the committing term.
                if terms.get(e.index, r.term + 1) > r.term:
                    terms[e.index] = r.term
                seen = self.committed.setdefault(e.index, (e.term, e.data))
                if seen != (e.term, e.data):
                    raise Violation(
                        "commit-conflict",
                        f"n{n.id} commits {e.index}/{e.term} {e.data[:24]!r}, "
                        f"already committed {seen[0]} {seen[1][:24]!r}",
                    )
        if new > self.max_commit:
            self.max_commit = new

    # -- log contents -----------------------------------------------------------------------
    def on_new_entries(self, n: SimNode, entries: tuple[Entry, ...]) -> None:
        rlog = n.rn.raft.log  # type: ignore[union-attr]
        prev_term = rlog.term(entries[0].index - 1)
        for e in entries:
            key = (e.index, e.term)
            seen = self.entries.setdefault(key, (e.data, prev_term, e.type))
            if seen != (e.data, prev_term, e.type):
                raise Violation(
                    "log-matching",
                    f"n{n.id} holds {e.index}/{e.term} {e.data[:24]!r} after term {prev_term}; "
                    f"another log has {seen[0][:24]!r} after term {seen[1]}",
                )
            prev_term = e.term

    # -- durability -------------------------------------------------------------------------
    def on_durable(self, n: SimNode, before: HardState) -> None:
        hs = n.disk.hard_state
        if hs.term < before.term:
            raise Violation("term-regressed", f"n{n.id} durable term {before.term} -> {hs.term}")
        if hs.term == before.term and before.vote != NONE and hs.vote != before.vote:
            raise Violation(
                "vote-changed",
                f"n{n.id} durable vote in term {hs.term}: {before.vote} -> {hs.vote}",
            )

    def on_restart(self, n: SimNode) -> None:
        r = n.rn.raft  # type: ignore[union-attr]
        hs = n.disk.hard_state
        if (r.term, r.vote) != (hs.term, hs.vote):
            raise Violation("restart-state", f"n{n.id} restarted at {r.term}/{r.vote}, disk {hs}")
        if r.log.committed < hs.commit:
            raise Violation(
                "commit-regressed", f"n{n.id} restarted at commit {r.log.committed} < {hs.commit}"
            )
        n.last_commit = r.log.committed
        n.led_term = -1

    def on_send(self, n: SimNode, m: Message) -> None:
        t = m.type
        if t is MT.PRE_VOTE or t is MT.PRE_VOTE_RESP or m.term == 0:
            return
        hs = n.disk.hard_state
        if m.term > hs.term:
            raise Violation(
                "unpersisted-term", f"n{n.id} sent {t.name} at term {m.term}, disk term {hs.term}"
            )
        if t is MT.VOTE_RESP and not m.reject:
            # A later term on disk also protects the vote: this node can never vote in the
            # grant's term again.
            if hs.term == m.term and hs.vote != m.to:
                raise Violation(
                    "unpersisted-vote",
                    f"n{n.id} granted its term-{m.term} vote to n{m.to}, disk has {hs}",
                )
            prev = self.votes.setdefault((n.id, m.term), m.to)
            if prev != m.to:
                raise Violation(
                    "double-vote", f"n{n.id} voted for n{prev} and n{m.to} in term {m.term}"
                )
        elif t is MT.APP_RESP and not m.reject and m.index > n.disk.last_index():
            raise Violation(
                "unpersisted-ack",
                f"n{n.id} acknowledged index {m.index}, disk ends at {n.disk.last_index()}",
            )

    # -- state machine ----------------------------------------------------------------------
    def on_apply(self, n: SimNode, e: Entry) -> None:
        if e.index != n.sm_index + 1:
            raise Violation("apply-gap", f"n{n.id} applies {e.index} after {n.sm_index}")
        chain = zlib.crc32(e.data, n.sm_chain)
        ref = self.applied.setdefault(e.index, (e.term, e.data, chain))
        if ref != (e.term, e.data, chain):
            raise Violation(
                "state-machine-safety",
                f"n{n.id} applies {e.index}/{e.term} {e.data[:24]!r}; others applied "
                f"{ref[0]} {ref[1][:24]!r}",
            )
        n.sm_index = e.index
        n.sm_chain = chain
        if e.data.startswith(b"p"):
            self.acked.setdefault(e.data, e.index)

    def on_restore(self, n: SimNode, snap: Snapshot) -> None:
        idx = snap.metadata.index
        chain = decode_state(snap.data)[1] if snap.data else 0
        if idx < n.sm_index:
            raise Violation("snapshot-regress", f"n{n.id} restores {idx} < applied {n.sm_index}")
        ref = self.applied.get(idx)
        if idx and ref is not None and ref[2] != chain:
            raise Violation("state-machine-safety", f"n{n.id} snapshot {idx} state differs")
        n.sm_index = idx
        n.sm_chain = chain

    def on_read_state(self, n: SimNode, rs: ReadState) -> None:
        floor = n.reads.pop(rs.context, None)
        if floor is not None and rs.index < floor:
            raise Violation(
                "stale-read",
                f"n{n.id} read {rs.context!r} at index {rs.index}, but {floor} was committed "
                "before the read was issued",
            )


def encode_state(index: int, chain: int) -> bytes:
    return b"%d:%d" % (index, chain)


def decode_state(data: bytes) -> tuple[int, int]:
    a, b = data.split(b":")
    return int(a), int(b)
