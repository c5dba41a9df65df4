"""Membership changes: single-server changes that take effect when appended, one at a time.

Which scheme, and why
---------------------
This core implements the single-server change scheme of Ongaro's thesis (§4.1-4.3), with the fix
for the bug he published in 2015, and not etcd's joint consensus:

* Every change adds or removes **one voter** (or only touches learners). Any majority of the old
  voter set and any majority of the new one then share a member, so the two configurations can
  never elect two leaders in one term or commit conflicting entries - without a joint phase.
* A configuration takes effect **as soon as it is in a node's log**, committed or not, and reverts
  if that log suffix is truncated. Each node therefore uses the latest configuration entry of its
  own log. This is the rule the thesis proves safe. etcd instead switches when an entry is
  *applied*; with single-server changes that lets a node whose commit index lags act on a
  configuration two changes old, whose majorities need not overlap the newest one's. Append-time
  adoption has no such window, and it makes the configuration a pure function of the log, which
  is what the simulator checks.
* **One pending change**: the leader refuses a change while the latest configuration entry in
  its log is uncommitted (``CONF_CHANGE_PENDING``), and
* **the 2015 fix**: it also refuses until it has committed an entry of its own term
  (``CONF_CHANGE_TOO_EARLY``); the empty entry every new leader appends makes this quick. Without
  it, a change appended by a deposed leader and one appended by its successor can each be
  "the one pending change" and together remove two voters' worth of overlap.

Why not joint consensus: meshgpu changes membership one host at a time (an autopilot adds a
learner, waits for it to catch up, promotes it; replacing a voter is add-then-remove). Joint
consensus buys arbitrary multi-node changes in one step, which we do not need, at the price of a
second quorum in every commit and vote computation. Run at least three voters: with two, every
change needs both, and losing either member stalls the cluster until it returns (etcd gives the
same advice for its two-member removal hazard).

Learners never count toward a quorum, so adding or removing them, and promoting one learner to
voter or demoting one voter to learner, are all single-server changes.

Each configuration entry carries the change *and the complete configuration it produces*, so a
node that joins late (or restores a snapshot) learns the whole configuration from one entry.
"""

from __future__ import annotations

import enum
import json
from bisect import bisect_right
from dataclasses import dataclass

from .errors import DropReason, ProposalDropped
from .types import NONE, ConfState, Entry, EntryType


class ConfChangeType(enum.Enum):
    ADD_VOTER = "add_voter"
    """Add a new voter, or promote a learner to voter."""
    ADD_LEARNER = "add_learner"
    """Add a new learner, or demote a voter to learner."""
    REMOVE = "remove"
    """Remove a voter or a learner for good; its ID may never come back."""


@dataclass(frozen=True, slots=True)
class ConfChange:
    type: ConfChangeType
    node_id: int
    context: bytes = b""
    """Opaque to the core; the runtime keeps e.g. the member's address here."""


def apply_change(cs: ConfState, cc: ConfChange) -> ConfState:
    """The configuration after ``cc``, or ``ProposalDropped(CONF_CHANGE_INVALID)``."""
    nid = cc.node_id

    def invalid(why: str) -> ProposalDropped:
        return ProposalDropped(DropReason.CONF_CHANGE_INVALID, f"{cc.type.value} {nid}: {why}")

    if nid == NONE or nid < 0:
        raise invalid("node IDs are positive integers")
    if nid in cs.removed:
        raise invalid("this ID was removed before and may never be reused")
    voters, learners = cs.voters, cs.learners
    if cc.type is ConfChangeType.ADD_VOTER:
        if nid in voters:
            raise invalid("already a voter")
        return ConfState(voters | {nid}, learners - {nid}, cs.removed)
    if cc.type is ConfChangeType.ADD_LEARNER:
        if nid in learners:
            raise invalid("already a learner")
        if nid in voters and len(voters) == 1:
            raise invalid("cannot demote the last voter")
        return ConfState(voters - {nid}, learners | {nid}, cs.removed)
    if cc.type is ConfChangeType.REMOVE:
        if nid not in voters and nid not in learners:
            raise invalid("not a member")
        if nid in voters and len(voters) == 1:
            raise invalid("cannot remove the last voter")
        return ConfState(voters - {nid}, learners - {nid}, cs.removed | {nid})
    raise invalid("unknown change type")  # pragma: no cover - enum is exhaustive


def encode_conf_change(cc: ConfChange, result: ConfState | None = None) -> bytes:
    """The payload of a configuration entry.

    A follower forwards its proposal without ``result``; the leader fills it in when it validates
    the change against the configuration at the end of its log.
    """
    doc: dict[str, object] = {"type": cc.type.value, "node": cc.node_id, "ctx": cc.context.hex()}
    if result is not None:
        doc["voters"] = sorted(result.voters)
        doc["learners"] = sorted(result.learners)
        doc["removed"] = sorted(result.removed)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode_conf_change(data: bytes) -> tuple[ConfChange, ConfState | None]:
    doc = json.loads(data)
    cc = ConfChange(ConfChangeType(doc["type"]), int(doc["node"]), bytes.fromhex(doc["ctx"]))
    if "voters" not in doc:
        return cc, None
    cs = ConfState(frozenset(doc["voters"]), frozenset(doc["learners"]), frozenset(doc["removed"]))
    return cc, cs


def conf_entry_state(e: Entry) -> ConfState:
    """The configuration a committed or appended configuration entry establishes."""
    _, cs = decode_conf_change(e.data)
    if cs is None:
        raise ValueError(f"configuration entry {e.index} carries no resulting configuration")
    return cs


class ConfigHistory:
    """The configurations established by one log: the base (from the snapshot, or the bootstrap
    configuration) and one per configuration entry after it, in index order.

    The node's configuration is the last one; truncating the log reverts to an earlier one.
    """

    __slots__ = ("_indexes", "_states")

    def __init__(self, base_index: int, base: ConfState) -> None:
        self._indexes: list[int] = [base_index]
        self._states: list[ConfState] = [base]

    def reset(self, base_index: int, base: ConfState) -> None:
        self._indexes = [base_index]
        self._states = [base]

    @property
    def latest(self) -> ConfState:
        return self._states[-1]

    @property
    def latest_index(self) -> int:
        """Index of the latest configuration entry (the base index if there is none)."""
        return self._indexes[-1]

    def at(self, index: int) -> ConfState:
        """The configuration in force right after the entry at ``index``."""
        pos = bisect_right(self._indexes, index) - 1
        if pos < 0:
            raise ValueError(f"no configuration known at index {index} (before the snapshot)")
        return self._states[pos]

    def truncate_from(self, index: int) -> None:
        """Forget configurations established at ``index`` or later (log suffix replaced)."""
        while len(self._indexes) > 1 and self._indexes[-1] >= index:
            self._indexes.pop()
            self._states.pop()

    def observe(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        for e in entries:
            if e.type == EntryType.CONF_CHANGE:
                self._indexes.append(e.index)
                self._states.append(conf_entry_state(e))

    def compact_to(self, index: int) -> None:
        """Drop history before ``index`` (a snapshot now covers it), keeping the one in force."""
        pos = bisect_right(self._indexes, index) - 1
        if pos > 0:
            del self._indexes[:pos]
            del self._states[:pos]
