"""The trio runtime for one Raft member: the single owner of the core, the fsync point, the applier.

Tasks (all children of the nursery that runs ``RaftNode.run``):

* **the owner loop** -- the only code that touches the ``RawNode``. It drains the inbox (peer
  messages, ticks, proposals, reads, membership and transfer requests), then carries out one
  ``Ready``: persist (``DiskStorage.write`` in a worker thread: one transaction, one fsync for the
  whole batch -- group commit, since everything that arrived during the previous fsync is in this
  one), mirror into the core's storage, *then* send (durability before visibility), then apply
  committed entries to the state machine and wake the callers waiting for them, then ``advance``.
* **the ticker** -- puts a tick in the inbox every ``tick_s``.

The transport is a separate object (``consensus.transport``): it calls ``deliver``,
``report_unreachable`` and ``report_snapshot`` on this node and offers ``send(messages)``.

Proposals carry an envelope ``[request_id, payload]``. The applier matches request ids to local
waiters (a follower forwards the proposal to the leader and is woken when the entry reaches its
own state machine), and remembers applied request ids -- in the snapshot too -- so a client that
retries a request (after a timeout, a leader change, or through another member) has it applied
once. While there is no leader, ``propose`` holds the request and re-submits it when a leader
appears, until its deadline.

A disk that cannot take a write (full, read-only: ``StorageFull``) does not stop the member. The
owner loop retries the same write, backing off to ``storage_retry_s``, until it succeeds; while it
waits it still steps what peers send and answers the leader's heartbeats (they promise nothing
durable), so the leader keeps this member in view, but it sends nothing that needs the disk (no
appends acknowledged, no votes), sends no heartbeats of its own (a leader that cannot write lets
the others elect one that can), and refuses proposals at once with ``StorageFull`` (as it does
while free space is under ``min_free_bytes``). When space returns the write goes through and the
member catches up by itself.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import trio

from consensus.core import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    DropReason,
    EntryType,
    Message,
    MessageType,
    ProposalDropped,
    RawNode,
    Ready,
    Role,
    Snapshot,
    SnapshotMetadata,
    decode_conf_change,
)
from consensus.storage import DiskStorage, StorageFull, free_bytes

log = logging.getLogger(__name__)


# Messages that promise nothing durable: sent, or dropped, while a write waits for space.
_HEARTBEAT_ANSWERS = frozenset({MessageType.HEARTBEAT_RESP})
_LEADER_HEARTBEATS = frozenset({MessageType.HEARTBEAT})


class StateMachine(Protocol):
    """What the application gives the node. ``apply`` must be deterministic.

    A state machine may also offer ``snapshot_view() -> Callable[[], bytes]``: a consistent copy
    taken at once (in the owner task, so it must be cheap) and a function that encodes it,
    which the node runs in a worker thread. Without it, ``snapshot`` runs in the owner task."""

    def apply(self, batch: list[tuple[int, bytes]]) -> list[Any]: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


class Transport(Protocol):
    def send(self, messages: Sequence[Message]) -> None:
        """Queue messages for their peers; never blocks (a full queue drops and reports the peer
        unreachable)."""

    def set_peer_address(self, node_id: int, address: str) -> None: ...


class NotLeader(Exception):
    """Raised by leader-only operations on a follower; ``leader`` says who leads (0 if unknown)."""

    def __init__(self, leader: int) -> None:
        super().__init__(f"not the leader (leader: {leader or 'unknown'})")
        self.leader = leader


class Timeout(Exception):
    """The request's deadline passed; it may or may not have taken effect (retry with the same
    request id to find out: it will not take effect twice)."""


_UNKNOWN = object()


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The request id had already been applied (at ``index``); the request had effect once.

    ``result`` is what that application returned when this node still remembers it; results are
    kept in memory only (the dedup window itself is in snapshots), so after a restart, or for an
    old request, ``known`` is False and the caller must look the outcome up in its state."""

    index: int
    result: Any = None
    known: bool = True


@dataclass(slots=True)
class NodeOptions:
    tick_s: float = 0.1
    election_tick: int = 10
    heartbeat_tick: int = 1
    snapshot_every: int = 10_000
    dedup_window: int = 100_000
    """How many recent request ids are remembered for idempotency (oldest forgotten first)."""
    propose_retry_s: float = 2.0
    """Re-submit a request not applied within this time (its forward may have been lost)."""
    min_free_bytes: int = 0
    """Proposals through this node are refused (``StorageFull``) while its data directory has
    less free space than this: what is left stays for the entries and votes of the others."""
    storage_retry_s: float = 1.0
    """How often a write the disk refused is tried again (at most; it starts faster)."""
    seed: int | None = None


class _Waiter:
    """A caller waiting for its request. ``event`` fires when the request is answered
    (``done``) or when leadership changed (``retry``): a request forwarded to a leader that is
    gone is lost, so it is re-submitted at once rather than after a timeout."""

    __slots__ = ("event", "result", "index", "done", "retry")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: Any = None
        self.index = 0
        self.done = False
        self.retry = False

    def rearm(self) -> None:
        self.retry = False
        self.event = trio.Event()


class RaftNode:
    def __init__(
        self,
        node_id: int,
        storage: DiskStorage,
        fsm: StateMachine,
        *,
        peers: dict[int, str] | None = None,
        options: NodeOptions | None = None,
    ) -> None:
        self.id = node_id
        self.storage = storage
        self.fsm = fsm
        self.options = opts = options or NodeOptions()
        self.transport: Transport | None = None
        self.addresses: dict[int, str] = dict(peers or {})
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[str, Any]](100_000)
        self._waiters: dict[bytes, _Waiter] = {}
        self._reads: dict[bytes, _Waiter] = {}
        self._applied_waiters: list[tuple[int, trio.Event]] = []
        self._leader_changed = trio.Event()
        self._dedup: OrderedDict[bytes, int] = OrderedDict()
        self._results: OrderedDict[bytes, Any] = OrderedDict()
        self._req_ids = itertools.count()
        self._req_prefix = os.urandom(8)
        self.applied = 0
        self.leader = 0
        self.role = Role.FOLLOWER
        self.term = 0
        self._since_snapshot = 0
        # A snapshot being encoded and written by ``_snapshot_off_loop`` (at most one), and
        # what it left for the owner to adopt: (snapshot or None if superseded, error).
        self._snapshotting = False
        self._snapshot_done: tuple[Snapshot | None, Exception | None] | None = None
        self.stats = {"writes": 0, "entries_written": 0}
        # When each peer was last heard from (any message), and since when a leader has been
        # watching it: liveness facts for the membership manager and for self-fencing.
        self.last_heard: dict[int, float] = {}
        self.watch_since: dict[int, float] = {}
        self.leader_since = 0.0
        self._lazy_hard_state: Any = None
        # Why this node cannot write now (a write the disk refused is being retried), or None.
        self.storage_error: str | None = None
        self._free: tuple[float, int] = (-1e9, 0)  # (when, bytes) of the last free-space check
        self._restore_from_storage()
        import random

        cfg = Config(
            id=node_id,
            election_tick=opts.election_tick,
            heartbeat_tick=opts.heartbeat_tick,
            applied=self.applied,
            rng=random.Random(
                opts.seed if opts.seed is not None else int.from_bytes(os.urandom(8), "big")
            ),
        )
        self.raw = RawNode(cfg, storage)

    # -- startup ------------------------------------------------------------------------------
    def _restore_from_storage(self) -> None:
        snap = self.storage.snapshot()
        if snap.metadata.index > 0:
            self._restore_snapshot_data(snap.data)
            self.applied = snap.metadata.index

    def _restore_snapshot_data(self, data: bytes) -> None:
        doc = msgpack.unpackb(data) if data else {"fsm": b"", "dedup": []}
        self.fsm.restore(doc["fsm"])
        self._dedup = OrderedDict((bytes(k), v) for k, v in doc["dedup"])

    def _snapshot_encoder(self) -> Callable[[], bytes]:
        """The state now (a consistent copy), and the function that encodes it with the
        dedup window: the copy is cheap, the encoding may run in a worker thread."""
        view = getattr(self.fsm, "snapshot_view", None)
        if view is not None:
            fsm: Callable[[], bytes] = view()
        else:
            data = self.fsm.snapshot()
            fsm = lambda: data  # noqa: E731
        dedup = list(self._dedup.items())
        return lambda: msgpack.packb({"fsm": fsm(), "dedup": dedup})

    def attach(self, transport: Transport) -> None:
        self.transport = transport
        for nid, addr in self.addresses.items():
            if nid != self.id:
                transport.set_peer_address(nid, addr)

    # -- entry points for the transport (any task) --------------------------------------------
    def deliver(self, msg: Message) -> None:
        self.last_heard[msg.frm] = trio.current_time()
        self._post("msg", msg)

    def report_unreachable(self, node_id: int) -> None:
        self._post("unreachable", node_id)

    def report_snapshot(self, node_id: int, ok: bool) -> None:
        self._post("snap_status", (node_id, ok))

    def _post(self, kind: str, value: Any) -> None:
        try:
            self._inbox_send.send_nowait((kind, value))
        except trio.WouldBlock:
            log.warning("node=%s inbox full; dropping %s", self.id, kind)

    # -- public API ---------------------------------------------------------------------------
    def new_request_id(self) -> bytes:
        return self._req_prefix + next(self._req_ids).to_bytes(8, "big")

    async def propose(
        self, data: bytes, *, request_id: bytes | None = None, timeout: float = 10.0
    ) -> Any:
        """Replicate ``data``; return the state machine's result once it is applied *here*.

        Held (and re-submitted) while there is no leader or leadership moves, until ``timeout``.
        Raises ``Timeout`` if the deadline passes, ``ProposalDropped`` for a refusal that
        waiting cannot cure (e.g. too many uncommitted bytes).
        """
        rid = request_id or self.new_request_id()
        envelope = msgpack.packb([rid, data])
        waiter = self._waiters.setdefault(rid, _Waiter())
        deadline = trio.current_time() + timeout
        first = True
        try:
            while True:
                if waiter.done:
                    return waiter.result
                if rid in self._dedup:
                    return self._duplicate(rid)
                self.check_writable(first)
                first = False
                waiter.rearm()
                refused: list[Exception] = []
                done = trio.Event()
                self._post("propose", (envelope, refused, done))
                await done.wait()
                if refused and (
                    not isinstance(refused[0], ProposalDropped)
                    or refused[0].reason
                    not in (DropReason.NO_LEADER, DropReason.TRANSFER_IN_PROGRESS)
                ):
                    raise refused[0]
                wait_until = min(deadline, trio.current_time() + self.options.propose_retry_s)
                with trio.move_on_at(wait_until):
                    if refused:
                        await self._leader_changed.wait()
                    else:
                        await waiter.event.wait()
                if waiter.done:
                    return waiter.result
                if trio.current_time() >= deadline:
                    raise Timeout(f"request not applied within {timeout}s")
        finally:
            if self._waiters.get(rid) is waiter:
                del self._waiters[rid]

    def check_writable(self, first: bool = True) -> None:
        """Raise ``StorageFull`` if this node cannot take writes now: a write its disk refused
        is pending, or its free space is under ``min_free_bytes``. ``first``: the request has
        not been proposed yet (otherwise it may still take effect once space is freed)."""
        if self.storage_error is not None:
            later = (
                ""
                if first
                else " (this request is in the log here: it may still take effect once space "
                "is freed; retry it with the same request id to find out)"
            )
            raise StorageFull(self.storage_error + later)
        reserve = self.options.min_free_bytes
        if reserve <= 0:
            return
        now = trio.current_time()
        when, free = self._free
        if now - when > 0.5:  # a statvfs costs microseconds, but not on every proposal
            try:
                free = free_bytes(self.storage.directory)
            except OSError:
                free = reserve
            self._free = (now, free)
        if free < reserve:
            raise StorageFull(
                f"the data directory {self.storage.directory} has {free / 2**20:.1f} MiB free, "
                f"under the {reserve / 2**20:.0f} MiB this node keeps in reserve: writes are "
                "refused until space is freed (reads still work)"
            )

    async def read_index(self, timeout: float = 10.0) -> int:
        """A linearizable read barrier: returns once this node has applied everything committed
        before the call; read local state after it."""
        deadline = trio.current_time() + timeout
        while True:
            ctx = self.new_request_id()
            waiter = self._reads.setdefault(ctx, _Waiter())
            self._post("read", ctx)
            with trio.move_on_at(min(deadline, trio.current_time() + self.options.propose_retry_s)):
                await waiter.event.wait()
            self._reads.pop(ctx, None)
            if waiter.done:
                await self.wait_applied(waiter.index)
                return waiter.index
            if trio.current_time() >= deadline:
                raise Timeout(f"read not confirmed within {timeout}s")
            if not waiter.retry:
                await trio.sleep(0)  # lost without a leader change: the loop re-asks

    async def wait_applied(self, index: int = 0, *, after: int | None = None) -> int:
        """Until ``index`` is applied here -- or, with ``after``, anything past ``after``;
        returns the applied index. This is how the rest of the application follows the state
        ("applied up to N"): each follower waits in its own task and reads the state when woken,
        so the owner task never runs their work (file writes, unsealing, network calls)."""
        if after is not None:
            index = after + 1
        if self.applied < index:
            ev = trio.Event()
            self._applied_waiters.append((index, ev))
            await ev.wait()
        return self.applied

    async def leader_changed(self) -> None:
        """Returns at the next change of leader (a change of this node's role comes with one:
        becoming leader, or stepping down for a candidate or another leader)."""
        await self._leader_changed.wait()

    def campaign(self) -> None:
        """Start an election now (a sole voter need not wait out an election timeout)."""
        self._post("campaign", None)

    async def transfer_leadership(self, to: int, timeout: float = 5.0) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        self._post("transfer", to)
        with trio.fail_after(timeout):
            while self.leader != to:
                await self._leader_changed.wait()

    async def _conf_change(
        self, cc_type: ConfChangeType, node_id: int, address: str, timeout: float
    ) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        self.check_writable()
        rid = self.new_request_id()
        cc = ConfChange(cc_type, node_id, msgpack.packb([rid, address]))
        waiter = self._waiters.setdefault(rid, _Waiter())
        refused: list[ProposalDropped] = []
        done = trio.Event()
        self._post("conf", (cc, refused, done))
        await done.wait()
        if refused:
            del self._waiters[rid]
            raise refused[0]
        try:
            with trio.fail_after(timeout):
                while not waiter.done:  # a leader change wakes us early; keep waiting
                    waiter.rearm()
                    await waiter.event.wait()
        except trio.TooSlowError:
            raise Timeout("membership change not applied in time (it may still apply)") from None
        finally:
            self._waiters.pop(rid, None)

    async def add_learner(self, node_id: int, address: str, timeout: float = 10.0) -> None:
        await self._conf_change(ConfChangeType.ADD_LEARNER, node_id, address, timeout)

    async def promote(self, node_id: int, timeout: float = 10.0) -> None:
        await self._conf_change(
            ConfChangeType.ADD_VOTER, node_id, self.addresses.get(node_id, ""), timeout
        )

    async def remove(self, node_id: int, timeout: float = 10.0) -> None:
        await self._conf_change(ConfChangeType.REMOVE, node_id, "", timeout)

    def status(self) -> dict[str, Any]:
        st = self.raw.status()
        return {
            "id": st.id,
            "role": st.role.name.lower(),
            "term": st.term,
            "leader": st.lead,
            "commit": st.commit,
            "applied": self.applied,
            "last_index": st.last_index,
            "voters": sorted(st.conf_state.voters),
            "learners": sorted(st.conf_state.learners),
            "writes": self.stats["writes"],
            "entries_written": self.stats["entries_written"],
            "progress": {
                k: {"match": v.match, "next": v.next, "state": v.state.name.lower()}
                for k, v in st.progress.items()
            },
        }

    # -- the runtime --------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._ticker)
            task_status.started()
            await self._owner_loop()

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(self.options.tick_s)
            self._post("tick", None)

    async def _owner_loop(self) -> None:
        raw = self.raw
        while True:
            if not raw.has_ready():
                kind, value = await self._inbox.receive()
                self._handle(kind, value)
            # Drain everything that queued up (e.g. during the last fsync): one Ready for all.
            while True:
                try:
                    kind, value = self._inbox.receive_nowait()
                except trio.WouldBlock:
                    break
                self._handle(kind, value)
            if self._snapshot_done is not None:
                self._adopt_snapshot()
            if raw.has_ready():
                await self._process_ready(raw.ready())

    def _handle(self, kind: str, value: Any) -> None:
        raw = self.raw
        if kind == "msg":
            try:
                raw.step(value)
            except ValueError as e:
                log.warning("node=%s bad message from=%s: %s", self.id, value.frm, e)
        elif kind == "tick":
            raw.tick()
        elif kind == "propose":
            envelope, refused, done = value
            if self.storage_error is not None:
                refused.append(StorageFull(self.storage_error))
            else:
                try:
                    raw.propose(envelope)
                except ProposalDropped as e:
                    refused.append(e)
            done.set()
        elif kind == "conf":
            cc, refused, done = value
            try:
                raw.propose_conf_change(cc)
            except ProposalDropped as e:
                refused.append(e)
            done.set()
        elif kind == "read":
            try:
                raw.read_index(value)
            except ProposalDropped:
                pass  # no leader: the reader retries after its interval
        elif kind == "campaign":
            raw.campaign()
        elif kind == "transfer":
            raw.transfer_leader(value)
        elif kind == "unreachable":
            raw.report_unreachable(value)
        elif kind == "snap_status":
            raw.report_snapshot(*value)
        # "snapshot_taken" only wakes the loop: ``_snapshot_done`` says what happened.

    async def _process_ready(self, rd: Ready) -> None:
        storage = self.storage
        # 1. persist: the fsync point. Nothing below happens before it.
        stalled = False
        if rd.must_sync or rd.entries or rd.snapshot is not None:
            hs = rd.hard_state or self._lazy_hard_state
            stalled = await self._persist(rd.entries, hs, rd.snapshot)
            self._lazy_hard_state = None
            self.stats["writes"] += 1
            self.stats["entries_written"] += len(rd.entries)
            storage.mirror(rd.entries, rd.hard_state, rd.snapshot)
        elif rd.hard_state is not None:
            # Only the commit index moved (must_sync is false): it need not be durable before
            # anything is sent -- a restarted node relearns it from the leader -- so it rides
            # along with the next synced write instead of costing an fsync of its own.
            self._lazy_hard_state = rd.hard_state
            storage.mirror((), rd.hard_state, None)
            for e in rd.entries:
                if e.type is EntryType.CONF_CHANGE:
                    self._learn_address(e.data)
        # 2. send
        if rd.messages and self.transport is not None:
            self.transport.send(rd.messages)
        # 3. apply (a stalled write followed the leader and role as they changed: ``rd``'s are
        # older than those)
        if rd.soft_state is not None and not stalled:
            self._on_soft_state(rd.soft_state.lead, rd.soft_state.role)
        if rd.hard_state is not None:
            self.term = rd.hard_state.term
        if rd.snapshot is not None and rd.snapshot.metadata.index > self.applied:
            self._restore_snapshot_data(rd.snapshot.data)
            self.applied = rd.snapshot.metadata.index
            for nid in rd.snapshot.metadata.conf_state.members():
                self.addresses.setdefault(nid, "")
        if rd.committed_entries:
            self._apply(rd.committed_entries)
        for rs in rd.read_states:
            w = self._reads.pop(rs.context, None)
            if w is not None:
                w.index, w.done = rs.index, True
                w.event.set()
        self.raw.advance(rd)
        self._wake_applied()
        if self._since_snapshot >= self.options.snapshot_every and not self._snapshotting:
            self._take_snapshot()

    async def _persist(self, entries: Sequence[Any], hs: Any, snapshot: Any) -> bool:
        """``storage.write`` in a worker thread, retried while the disk refuses it (see the
        module docstring). True if it had to wait."""
        delay = min(0.05, self.options.storage_retry_s)
        stalled = False
        while True:
            try:
                await trio.to_thread.run_sync(self.storage.write, entries, hs, snapshot)
            except StorageFull as e:
                if self.storage_error is None:
                    log.error(
                        "node=%s cannot persist the Raft log: %s; refusing writes and retrying "
                        "until space is freed",
                        self.id,
                        e,
                    )
                    self.storage_error = (
                        f"this node cannot write to its data directory ({e}): writes are "
                        "refused until space is freed (reads still work)"
                    )
                    for w in self._waiters.values():
                        if not w.done:  # their callers hear now, not at their deadline
                            w.retry = True
                            w.event.set()
                stalled = True
                self._follow_soft_state()
                with trio.move_on_after(delay):
                    await self._serve_stalled()
                delay = min(delay * 2, self.options.storage_retry_s)
                continue
            if self.storage_error is not None:
                log.warning("node=%s the data directory takes writes again", self.id)
                self.storage_error = None
            return stalled

    def _follow_soft_state(self) -> None:
        """While a write waits: ``leader`` and ``role`` as the core has them now (a stalled
        leader is deposed by the others; callers must not take it for the leader)."""
        r = self.raw.raft
        if r.lead != self.leader or r.role is not self.role:
            self._on_soft_state(r.lead, r.role)

    async def _serve_stalled(self) -> None:
        """While a write waits for space: step what arrives (but no proposals: they would only
        pile up in memory), answer heartbeats, and send no heartbeats of our own."""
        raw = self.raw
        while True:
            kind, value = await self._inbox.receive()
            if kind == "msg" and value.type is MessageType.PROP:
                continue
            if kind == "conf":
                value[1].append(StorageFull(self.storage_error or "no space"))
                value[2].set()
                continue
            self._handle(kind, value)
            self._follow_soft_state()
            raw.take_messages(_LEADER_HEARTBEATS)  # dropped: let a leader that can write lead
            answers = raw.take_messages(_HEARTBEAT_ANSWERS)
            if answers and self.transport is not None:
                self.transport.send(answers)

    def _on_soft_state(self, lead: int, role: Role) -> None:
        changed = lead != self.leader
        if role is Role.LEADER and self.role is not Role.LEADER:
            self.watch_since.clear()
            self.leader_since = trio.current_time()
        self.leader, self.role = lead, role
        if changed:
            log.info("node=%s leader=%s role=%s", self.id, lead, role.name.lower())
            self._leader_changed.set()
            self._leader_changed = trio.Event()
            if lead:
                for w in (*self._waiters.values(), *self._reads.values()):
                    if not w.done:
                        w.retry = True
                        w.event.set()

    def _learn_address(self, data: bytes) -> None:
        cc, _ = decode_conf_change(data)
        if cc.context:
            _, address = msgpack.unpackb(cc.context)
            if address and cc.node_id != self.id:
                self.addresses[cc.node_id] = address
                if self.transport is not None:
                    self.transport.set_peer_address(cc.node_id, address)

    def _apply(self, entries: Sequence[Any]) -> None:
        batch: list[tuple[int, bytes]] = []
        rids: list[bytes] = []
        dups: dict[bytes, int] = {}
        for e in entries:
            if e.type is EntryType.CONF_CHANGE:
                self._flush(batch, rids)
                batch, rids = [], []
                cc, _ = decode_conf_change(e.data)
                if cc.context:
                    rid, _ = msgpack.unpackb(cc.context)
                    self._wake(bytes(rid), None, e.index)
                continue
            if not e.data:
                batch.append((e.index, b""))
                rids.append(b"")
                continue
            rid, payload = msgpack.unpackb(e.data)
            rid = bytes(rid)
            if rid in self._dedup:
                dups[rid] = self._dedup[rid]
                batch.append((e.index, b""))  # already applied once: apply as a no-op
                rids.append(b"")
                self._wake(rid, self._duplicate(rid), e.index)
                continue
            self._dedup[rid] = e.index
            batch.append((e.index, payload))
            rids.append(rid)
        self._flush(batch, rids)
        self.applied = entries[-1].index
        while len(self._dedup) > self.options.dedup_window:
            self._dedup.popitem(last=False)
        self._since_snapshot += len(entries)

    def _duplicate(self, rid: bytes) -> Duplicate:
        result = self._results.get(rid, _UNKNOWN)
        if result is _UNKNOWN:
            return Duplicate(self._dedup[rid], None, known=False)
        return Duplicate(self._dedup[rid], result)

    def _flush(self, batch: list[tuple[int, bytes]], rids: list[bytes]) -> None:
        if not batch:
            return
        results = self.fsm.apply(batch)
        for (index, _), rid, result in zip(batch, rids, results, strict=True):
            if rid:
                self._results[rid] = result
                if len(self._results) > 10_000:
                    self._results.popitem(last=False)
                self._wake(rid, result, index)

    def _wake(self, rid: bytes, result: Any, index: int) -> None:
        w = self._waiters.get(rid)
        if w is not None and not w.done:
            w.result, w.index, w.done = result, index, True
            w.event.set()

    def _wake_applied(self) -> None:
        if not self._applied_waiters:
            return
        keep = []
        for index, ev in self._applied_waiters:
            if self.applied >= index:
                ev.set()
            else:
                keep.append((index, ev))
        self._applied_waiters = keep

    def _take_snapshot(self) -> None:
        """Start a snapshot at the applied index. Only the copy of the state is taken here;
        encoding it and writing it (seconds, for a large state) happen in ``_snapshot_off_loop``
        while this task goes on persisting, sending heartbeats and applying; ``_adopt_snapshot``
        then compacts the in-memory log here."""
        started = time.perf_counter()
        meta = self.raw.snapshot_metadata(self.applied)
        encode = self._snapshot_encoder()
        self._since_snapshot = 0
        self._snapshotting = True
        self._nursery.start_soon(self._snapshot_off_loop, meta, encode, started)

    async def _snapshot_off_loop(
        self, meta: SnapshotMetadata, encode: Callable[[], bytes], started: float
    ) -> None:
        on_loop_ms = (time.perf_counter() - started) * 1000
        snap: Snapshot | None = None
        error: Exception | None = None
        try:
            data = await trio.to_thread.run_sync(encode)
            snap = await trio.to_thread.run_sync(self.storage.persist_snapshot, meta, data)
        except StorageFull as e:
            error = e
        self._snapshot_done = (snap, error)
        self._post("snapshot_taken", None)
        if snap is not None:
            log.info(
                "node=%s snapshot index=%s took_ms=%.1f on_loop_ms=%.1f",
                self.id,
                meta.index,
                (time.perf_counter() - started) * 1000,
                on_loop_ms,
            )

    def _adopt_snapshot(self) -> None:
        assert self._snapshot_done is not None
        snap, error = self._snapshot_done
        self._snapshot_done = None
        self._snapshotting = False
        if error is not None:  # the log stays as it is; try again a little later
            every = self.options.snapshot_every
            self._since_snapshot = max(self._since_snapshot, every - max(1, every // 10))
            log.warning("node=%s snapshot deferred: %s", self.id, error)
            return
        if snap is not None and self.storage.adopt_snapshot(snap):
            self.raw.compacted(snap.metadata.index)


def bootstrap_storage(directory: str, voters: Sequence[int]) -> DiskStorage:
    """Open (or create) a founding member's storage for a cluster of ``voters``."""
    s = DiskStorage(directory)
    if (
        s.last_index() == 0
        and s.snapshot().metadata.index == 0
        and not s.snapshot().metadata.conf_state.voters
    ):
        s.initialize(ConfState(frozenset(voters)))
    return s
