"""Compact one-line renderings of messages and Ready batches, for traces and scenario output."""

from __future__ import annotations

from consensus.core import Entry, EntryType, Message, MessageType, Ready

MT = MessageType


def fmt_entry(e: Entry) -> str:
    if e.type == EntryType.CONF_CHANGE:
        from consensus.core import decode_conf_change

        cc, _ = decode_conf_change(e.data)
        body = f"{cc.type.value} {cc.node_id}"
    elif not e.data:
        body = "empty"
    else:
        body = e.data[:16].decode("ascii", "replace")
    return f"{e.term}/{e.index} {body}"


def fmt_entries(ents: tuple[Entry, ...]) -> str:
    if not ents:
        return "[]"
    if len(ents) <= 3:
        return "[" + ", ".join(fmt_entry(e) for e in ents) + "]"
    return f"[{fmt_entry(ents[0])} .. {fmt_entry(ents[-1])} ({len(ents)})]"


def fmt_msg(m: Message) -> str:
    s = f"{m.frm}->{m.to} {m.type.name} t{m.term}"
    t = m.type
    if t is MT.APP:
        s += f" prev={m.log_term}/{m.index} commit={m.commit} {fmt_entries(m.entries)}"
    elif t is MT.APP_RESP:
        s += f" index={m.index}"
        if m.reject:
            s += f" reject hint={m.log_term}/{m.reject_hint}"
    elif t in (MT.VOTE, MT.PRE_VOTE):
        s += f" last={m.log_term}/{m.index}"
        if m.context:
            s += " transfer"
    elif t in (MT.VOTE_RESP, MT.PRE_VOTE_RESP):
        s += " reject" if m.reject else " granted"
    elif t is MT.HEARTBEAT:
        s += f" commit={m.commit}"
    elif t is MT.SNAP and m.snapshot is not None:
        md = m.snapshot.metadata
        s += f" snap={md.term}/{md.index} voters={sorted(md.conf_state.voters)}"
        if md.conf_state.learners:
            s += f" learners={sorted(md.conf_state.learners)}"
    elif t is MT.PROP:
        s += f" {fmt_entries(m.entries)}"
    elif t is MT.READ_INDEX_RESP:
        s += f" index={m.index}"
    if t in (MT.HEARTBEAT, MT.HEARTBEAT_RESP, MT.READ_INDEX, MT.READ_INDEX_RESP) and m.context:
        s += f" ctx={m.context.decode('ascii', 'replace')}"
    return s


def fmt_ready(rd: Ready) -> str:
    parts = []
    if rd.soft_state is not None:
        parts.append(f"{rd.soft_state.role.name} lead={rd.soft_state.lead}")
    if rd.hard_state is not None:
        hs = rd.hard_state
        parts.append(f"hs=t{hs.term}/v{hs.vote}/c{hs.commit}")
    if rd.snapshot is not None:
        md = rd.snapshot.metadata
        parts.append(f"snapshot={md.term}/{md.index}")
    if rd.entries:
        parts.append(f"entries={fmt_entries(rd.entries)}")
    if rd.committed_entries:
        parts.append(f"apply={fmt_entries(rd.committed_entries)}")
    if rd.read_states:
        parts.append(
            "reads="
            + ",".join(f"{r.context.decode('ascii', 'replace')}@{r.index}" for r in rd.read_states)
        )
    if rd.messages:
        parts.append(f"msgs={len(rd.messages)}")
    if rd.must_sync:
        parts.append("sync")
    return " ".join(parts)
