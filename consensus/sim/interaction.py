"""A hand-driven cluster for scenario scripts (etcd-io/raft's "interaction" environment).

Every message delivery, tick, and Ready is an explicit command, so a script is a fully
deterministic scenario; its output is compared with the expected text in the file. Commands:

``add-nodes N [voters=1,2,3] [learners=4] [pre-vote=false] [check-quorum=false]
[max-size-per-msg=B] [max-inflight=N] [max-inflight-bytes=B] [max-uncommitted=B]
[election-tick=N] [heartbeat-tick=N] [bootstrap=false]``
    Create N nodes with the next free IDs, bootstrapped with the given configuration (default:
    all nodes created so far and now are voters), or empty (``bootstrap=false``: joiners).
``campaign ID`` · ``tick ID [N]`` · ``tick-election ID`` · ``tick-heartbeat ID``
``propose ID DATA`` · ``propose-conf-change ID add-voter|add-learner|remove NODE``
``read-index ID CTX`` · ``transfer-leader ID TO`` · ``forget-leader ID``
``report-unreachable ID PEER`` · ``report-snapshot ID PEER ok|fail`` · ``compact ID INDEX``
    Inputs to node ID; a refusal prints ``dropped: REASON``.
``process-ready [ID...]``
    Persist, send (into the mailbox), apply and advance one Ready per node; print it.
``deliver-msgs [ID...] [type=T] [drop=true] [reverse=true] [dup=true]``
    Deliver (or drop) the queued messages addressed to the nodes (all by default), in order, in
    reverse order (reordering), or each twice (duplication).
``stabilize [ID...]``
    Alternate process-ready and deliver-msgs until nothing moves.
``partition A,B C,D`` · ``isolate ID`` · ``heal``
    Messages between the groups are dropped on delivery.
``crash ID`` · ``restart ID``
    Stop a node (its queued and future messages are lost) and bring it back from its storage.
``raft-state`` · ``raft-log ID`` · ``status ID`` · ``applied ID`` · ``mailbox``
``set-randomized-election-timeout ID N``
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from consensus.core import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    MemoryStorage,
    Message,
    MessageType,
    ProposalDropped,
    RawNode,
    Ready,
    Role,
)

from .trace import fmt_entry, fmt_msg

MT = MessageType


@dataclass
class Node:
    id: int
    storage: MemoryStorage
    cfg: dict[str, object]
    rn: RawNode | None = None
    applied: list[str] = field(default_factory=list)


def _parse_ids(s: str) -> frozenset[int]:
    return frozenset(int(x) for x in s.split(",") if x)


class InteractionEnv:
    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}
        self.mailbox: list[Message] = []
        self.groups: list[frozenset[int]] = []

    # -- dispatch ---------------------------------------------------------------------------
    def handle(self, line: str) -> list[str]:
        words = line.split()
        cmd, args = words[0], words[1:]
        pos = [a for a in args if "=" not in a]
        kw = dict(a.split("=", 1) for a in args if "=" in a)
        fn = getattr(self, "cmd_" + cmd.replace("-", "_"), None)
        if fn is None:
            raise ValueError(f"unknown command {cmd!r}")
        try:
            out: list[str] = fn(pos, kw)
        except (ValueError, RuntimeError) as e:
            # Refusals of the API are part of a scenario's expected output.
            return [f"error: {type(e).__name__}: {e}"]
        return out

    def node(self, s: str) -> Node:
        n = self.nodes[int(s)]
        if n.rn is None:
            raise ValueError(f"node {n.id} is down")
        return n

    def _request(self, fn: object, *a: object) -> list[str]:
        try:
            fn(*a)  # type: ignore[operator]
        except ProposalDropped as e:
            return [f"dropped: {e.reason.name}" + (f" ({e.detail})" if e.detail else "")]
        return []

    # -- building -------------------------------------------------------------------------
    def cmd_add_nodes(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        count = int(pos[0])
        first = max(self.nodes, default=0) + 1
        ids = list(range(first, first + count))
        if "voters" in kw:
            voters = _parse_ids(kw["voters"])
        else:
            voters = frozenset(self.nodes) | frozenset(ids)
        learners = _parse_ids(kw.get("learners", ""))
        bootstrap = kw.get("bootstrap", "true") == "true"
        out = []
        for nid in ids:
            st = (
                MemoryStorage.bootstrap(ConfState(voters, learners))
                if bootstrap
                else MemoryStorage()
            )
            n = Node(nid, st, dict(kw))
            self.nodes[nid] = n
            self._start(n)
            cs = n.rn.raft.log.conf_state  # type: ignore[union-attr]
            out.append(f"node {nid}: voters={sorted(cs.voters)} learners={sorted(cs.learners)}")
        return out

    def _start(self, n: Node) -> None:
        kw = n.cfg
        cfg = Config(
            id=n.id,
            election_tick=int(kw.get("election-tick", 10)),  # type: ignore[call-overload]
            heartbeat_tick=int(kw.get("heartbeat-tick", 1)),  # type: ignore[call-overload]
            pre_vote=kw.get("pre-vote", "true") == "true",
            check_quorum=kw.get("check-quorum", "true") == "true",
            max_size_per_msg=int(kw.get("max-size-per-msg", 1 << 20)),  # type: ignore[call-overload]
            max_inflight_msgs=int(kw.get("max-inflight", 256)),  # type: ignore[call-overload]
            max_inflight_bytes=int(kw.get("max-inflight-bytes", 0)),  # type: ignore[call-overload]
            max_uncommitted_entries_size=int(kw.get("max-uncommitted", 0)),  # type: ignore[call-overload]
            rng=random.Random(n.id),
        )
        n.rn = RawNode(cfg, n.storage)
        # Scripts want elections they can predict: start everyone at the minimum timeout.
        n.rn.raft.randomized_election_timeout = cfg.election_tick

    # -- inputs -------------------------------------------------------------------------------
    def cmd_campaign(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        self.node(pos[0]).rn.campaign()  # type: ignore[union-attr]
        return []

    def cmd_tick(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        n = self.node(pos[0])
        for _ in range(int(pos[1]) if len(pos) > 1 else 1):
            n.rn.tick()  # type: ignore[union-attr]
        return []

    def cmd_tick_election(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        n = self.node(pos[0])
        for _ in range(n.rn.raft.randomized_election_timeout):  # type: ignore[union-attr]
            n.rn.tick()  # type: ignore[union-attr]
        return []

    def cmd_tick_heartbeat(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        n = self.node(pos[0])
        for _ in range(n.rn.raft.heartbeat_timeout):  # type: ignore[union-attr]
            n.rn.tick()  # type: ignore[union-attr]
        return []

    def cmd_set_randomized_election_timeout(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        self.node(pos[0]).rn.raft.randomized_election_timeout = int(pos[1])  # type: ignore[union-attr]
        return []

    def cmd_propose(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        n = self.node(pos[0])
        return self._request(n.rn.propose, pos[1].encode())  # type: ignore[union-attr]

    def cmd_propose_conf_change(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        n = self.node(pos[0])
        typ = ConfChangeType(pos[1].replace("-", "_"))
        return self._request(n.rn.propose_conf_change, ConfChange(typ, int(pos[2])))  # type: ignore[union-attr]

    def cmd_read_index(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        n = self.node(pos[0])
        return self._request(n.rn.read_index, pos[1].encode())  # type: ignore[union-attr]

    def cmd_transfer_leader(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        n = self.node(pos[0])
        return self._request(n.rn.transfer_leader, int(pos[1]))  # type: ignore[union-attr]

    def cmd_forget_leader(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        self.node(pos[0]).rn.forget_leader()  # type: ignore[union-attr]
        return []

    def cmd_report_unreachable(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        self.node(pos[0]).rn.report_unreachable(int(pos[1]))  # type: ignore[union-attr]
        return []

    def cmd_report_snapshot(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        self.node(pos[0]).rn.report_snapshot(int(pos[1]), pos[2] == "ok")  # type: ignore[union-attr]
        return []

    def cmd_compact(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        n = self.node(pos[0])
        index = int(pos[1])
        data = f"state@{index}:" + ",".join(n.applied[:index])
        snap = n.rn.compact(index, data.encode())  # type: ignore[union-attr]
        md = snap.metadata
        return [
            f"snapshot {md.term}/{md.index} voters={sorted(md.conf_state.voters)}; "
            f"log now starts at {n.storage.first_index()}"
        ]

    # -- the Ready loop -----------------------------------------------------------------------
    def _process(self, n: Node) -> list[str]:
        rn = n.rn
        assert rn is not None
        rd = rn.ready()
        out = [f"> {n.id} handling Ready"] + ["  " + s for s in describe_ready(rd)]
        st = n.storage
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
        if rd.entries:
            st.append(rd.entries)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        self.mailbox.extend(rd.messages)
        if rd.snapshot is not None:
            # The state machine restores from the snapshot: everything it had is replaced.
            data = rd.snapshot.data.decode()
            n.applied = data.split(":", 1)[1].split(",") if ":" in data and data[-1] != ":" else []
        for e in rd.committed_entries:
            n.applied.append(fmt_entry(e))
        rn.advance(rd)
        return out

    def _targets(self, pos: list[str]) -> list[Node]:
        ids = [int(p) for p in pos] if pos else sorted(self.nodes)
        return [self.nodes[i] for i in ids if self.nodes[i].rn is not None]

    def cmd_process_ready(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        out: list[str] = []
        for n in self._targets(pos):
            if n.rn is not None and n.rn.has_ready():
                out += self._process(n)
        return out

    def _blocked(self, frm: int, to: int) -> bool:
        return any((frm in g) != (to in g) for g in self.groups)

    def cmd_deliver_msgs(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        targets = {int(p) for p in pos} if pos else None
        want_type = kw.get("type")
        drop = kw.get("drop") == "true"
        out: list[str] = []
        keep: list[Message] = []
        batch = self.mailbox
        self.mailbox = []
        chosen = [
            m
            for m in batch
            if (targets is None or m.to in targets)
            and (want_type is None or m.type.name == want_type.upper().replace("-", "_"))
        ]
        if kw.get("reverse") == "true":
            # Reordering: the later messages overtake the earlier ones.
            order = {id(m): i for i, m in enumerate(reversed(chosen))}
            batch = sorted(batch, key=lambda m: order.get(id(m), -1))
        if kw.get("dup") == "true":
            batch = [m for m in batch for _ in range(2 if id(m) in {id(c) for c in chosen} else 1)]
        for m in batch:
            if (targets is not None and m.to not in targets) or (
                want_type is not None and m.type.name != want_type.upper().replace("-", "_")
            ):
                keep.append(m)
                continue
            to = self.nodes.get(m.to)
            if drop or to is None or to.rn is None or self._blocked(m.frm, m.to):
                why = "dropped" if drop else "lost"
                out.append(f"{fmt_msg(m)} -- {why}")
                continue
            out.append(fmt_msg(m))
            to.rn.step(m)
        self.mailbox = keep + self.mailbox
        return out

    def cmd_stabilize(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        out: list[str] = []
        ids = [int(p) for p in pos] if pos else None
        for _ in range(1000):
            moved = False
            for n in self._targets(pos):
                if n.rn is not None and n.rn.has_ready():
                    out += self._process(n)
                    moved = True
            pending = [m for m in self.mailbox if ids is None or m.to in ids]
            if pending:
                delivered = self.cmd_deliver_msgs(pos, {})
                out += delivered
                moved = moved or bool(delivered)
            if not moved:
                return out
        raise RuntimeError("stabilize did not converge")

    # -- faults -------------------------------------------------------------------------------
    def cmd_partition(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        self.groups = [_parse_ids(p) for p in pos]
        return []

    def cmd_isolate(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        self.groups.append(frozenset({int(pos[0])}))
        return []

    def cmd_heal(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        self.groups = []
        return []

    def cmd_crash(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        n = self.nodes[int(pos[0])]
        n.rn = None
        n.applied = []
        # What was in flight to it is lost with the process.
        self.mailbox = [m for m in self.mailbox if m.to != n.id]
        return []

    def cmd_restart(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        n = self.nodes[int(pos[0])]
        # Every Ready was persisted before its messages left, so the storage is the disk.
        snap = n.storage.snapshot()
        data = snap.data.decode()
        n.applied = data.split(":", 1)[1].split(",") if ":" in data and data[-1] != ":" else []
        self._start(n)
        hs = n.storage.initial_state()
        return [f"node {n.id} restarted: term={hs.term} vote={hs.vote} commit={hs.commit}"]

    # -- inspection -----------------------------------------------------------------------------
    def cmd_raft_state(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        out = []
        for nid, n in sorted(self.nodes.items()):
            if n.rn is None:
                out.append(f"{nid}: DOWN")
                continue
            r = n.rn.raft
            cs = r.log.conf_state
            line = (
                f"{nid}: {r.role.name} term={r.term} vote={r.vote} lead={r.lead} "
                f"commit={r.log.committed} applied={r.log.applied} last={r.log.last_index()} "
                f"voters={sorted(cs.voters)}"
            )
            if cs.learners:
                line += f" learners={sorted(cs.learners)}"
            out.append(line)
        return out

    def cmd_raft_log(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        r = self.node(pos[0]).rn.raft  # type: ignore[union-attr]
        first = r.log.first_index()
        out = [f"first={first} last={r.log.last_index()} commit={r.log.committed}"]
        out += [fmt_entry(e) for e in r.log.all_entries()]
        return out

    def cmd_status(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        n = self.node(pos[0])
        st = n.rn.status()  # type: ignore[union-attr]
        out = [f"{st.id}: {st.role.name} term={st.term} commit={st.commit} last={st.last_index}"]
        if st.role is Role.LEADER:
            r = n.rn.raft  # type: ignore[union-attr]
            for nid, pr in sorted(r.trk.progress.items()):
                out.append(f"  {nid}: {pr!r}")
            if st.lead_transferee:
                out.append(f"  transferring to {st.lead_transferee}")
        return out

    def cmd_applied(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        n = self.nodes[int(pos[0])]
        return [", ".join(n.applied) if n.applied else "(nothing)"]

    def cmd_mailbox(self, pos: list[str], kw: dict[str, str]) -> list[str]:
        return [fmt_msg(m) for m in self.mailbox] or ["(empty)"]


def describe_ready(rd: Ready) -> list[str]:
    out = []
    if rd.soft_state is not None:
        out.append(f"role={rd.soft_state.role.name} lead={rd.soft_state.lead}")
    if rd.hard_state is not None:
        hs = rd.hard_state
        out.append(f"hard state: term={hs.term} vote={hs.vote} commit={hs.commit}")
    if rd.snapshot is not None:
        md = rd.snapshot.metadata
        out.append(f"snapshot: {md.term}/{md.index} voters={sorted(md.conf_state.voters)}")
    if rd.entries:
        out.append("entries:")
        out += ["  " + fmt_entry(e) for e in rd.entries]
    if rd.committed_entries:
        out.append("apply:")
        out += ["  " + fmt_entry(e) for e in rd.committed_entries]
    for rs in rd.read_states:
        out.append(f"read state: ctx={rs.context.decode()} index={rs.index}")
    if rd.messages:
        out.append("messages:")
        out += ["  " + fmt_msg(m) for m in rd.messages]
    if rd.must_sync:
        out.append("must sync")
    return out
