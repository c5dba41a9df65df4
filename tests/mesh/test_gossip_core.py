"""The gossip core's rules, driven by hand: packets in, outgoing packets and events out."""

from __future__ import annotations

import random

import pytest

from meshgpu.mesh.gossip import (
    Ack,
    Addr,
    Alive,
    ConfigError,
    Dead,
    DecodeError,
    EventKind,
    Gossip,
    GossipConfig,
    IndirectPing,
    MemberRecord,
    MemberState,
    MetaTooLarge,
    Nack,
    Outgoing,
    Ping,
    PushPull,
    Suspect,
    decode,
    encode,
)

LAN = GossipConfig.lan()


def addr(i: int) -> Addr:
    return (f"10.0.0.{i}", 7481)


def node(i: int) -> str:
    return f"n{i}"


def make(n: int = 1, config: GossipConfig = LAN, seed: int = 0, now: float = 0.0) -> Gossip:
    """Member n0 that already knows members n1 .. n(n-1), all at incarnation 1."""
    g = Gossip(node(0), addr(0), {"gpus": "8xH100"}, config, random.Random(seed))
    records = [MemberRecord(node(i), addr(i), 1, MemberState.ALIVE, {}) for i in range(1, n)]
    g.bootstrap(now, records)
    g.events()
    return g


def sent(out: list[Outgoing]) -> list[tuple[Addr, object]]:
    """(destination, message) for every message of every datagram."""
    return [(o.to, m) for o in out if not o.stream for m in o.messages]


def kinds(g: Gossip, member: str | None = None) -> list[EventKind]:
    return [e.kind for e in g.events() if member is None or e.member.id == member]


def run_until(
    g: Gossip, t: float, now: float, silent: frozenset[str] = frozenset()
) -> tuple[float, list[Outgoing]]:
    """Tick ``g`` at each deadline up to ``t`` on a responsive network: every ping to a member
    not in ``silent`` is acked at once. Returns the last time and everything sent."""
    out: list[Outgoing] = []
    while (d := g.next_deadline()) is not None and d <= t:
        now = max(now, d)
        for o in g.tick(now):
            out.append(o)
            ping = o.messages[0]
            if isinstance(ping, Ping) and ping.target not in silent:
                g.receive(now, o.to, encode([Ack(ping.seq)]))
    return now, out


# ------------------------------------------------------------------ refutation and incarnations


def test_suspected_member_refutes_with_a_higher_incarnation() -> None:
    g = make(5)
    g.tick(0.0)
    inc = g.incarnation
    g.receive(1.0, addr(3), encode([Suspect(node(0), inc, node(3))]))
    assert g.incarnation == inc + 1
    assert (Alive(node(0), inc + 1, addr(0), {"gpus": "8xH100"}), 0) in g.pending_broadcasts()
    assert g.health_score == 1  # being accused is a hint that we are the slow one
    assert g.member(node(0)).state is MemberState.ALIVE  # type: ignore[union-attr]
    # A death verdict is refuted the same way, outbidding the accused incarnation.
    g.receive(2.0, addr(3), encode([Dead(node(0), 40, node(3))]))
    assert g.incarnation == 41
    assert EventKind.DEAD not in kinds(g)


def test_alive_about_us_from_an_earlier_life_is_outbid() -> None:
    g = make(3)
    g.receive(1.0, addr(1), encode([Alive(node(0), 9, addr(0), {"old": True})]))
    assert g.incarnation == 10
    assert g.member(node(0)).meta == {"gpus": "8xH100"}  # type: ignore[union-attr]


def test_news_with_an_older_incarnation_is_ignored() -> None:
    g = make(3)
    g.receive(1.0, addr(1), encode([Alive(node(1), 5, addr(1), {"v": 5})]))
    assert kinds(g, node(1)) == [EventKind.UPDATED]
    g.receive(2.0, addr(1), encode([Alive(node(1), 4, addr(1), {"v": 4})]))
    g.receive(2.0, addr(2), encode([Suspect(node(1), 4, node(2)), Dead(node(1), 4, node(2))]))
    m = g.member(node(1))
    assert m is not None and (m.state, m.incarnation, m.meta) == (MemberState.ALIVE, 5, {"v": 5})
    assert kinds(g) == []


def test_a_restarted_member_refutes_the_stale_verdict_it_learns_on_join() -> None:
    # memberlist#311: the member comes back at incarnation 1 while peers hold it dead at 50;
    # the push/pull of its join tells it so, and it outbids the verdict.
    g = Gossip(node(0), addr(0), {}, LAN, random.Random(1))
    out = g.join(0.0, [addr(1)])
    assert [o.to for o in out if o.stream] == [addr(1)]
    remote = PushPull(
        (
            MemberRecord(node(1), addr(1), 3, MemberState.ALIVE, {}),
            MemberRecord(node(0), addr(0), 50, MemberState.DEAD, {}),
        ),
        reply=True,
    )
    g.receive(0.01, addr(1), encode([remote]))
    assert g.incarnation == 51
    assert (Alive(node(0), 51, addr(0), {}), 0) in g.pending_broadcasts()
    assert g.member(node(1)).state is MemberState.ALIVE  # type: ignore[union-attr]


# ------------------------------------------------------------------ suspicion and death


def test_suspicion_timer_shrinks_with_independent_confirmations() -> None:
    g = make(10)  # n = 10: min 4 s, max 24 s, k = 2
    g.receive(1.0, addr(2), encode([Suspect(node(1), 1, node(2))]))
    assert kinds(g, node(1)) == [EventKind.SUSPECT]
    assert (Suspect(node(1), 1, node(2)), 0) in g.pending_broadcasts()
    g.receive(2.0, addr(3), encode([Suspect(node(1), 1, node(2))]))  # the accuser again
    g.receive(2.0, addr(3), encode([Suspect(node(1), 1, node(3))]))
    # A new confirmation is re-gossiped so that every member's timer shrinks.
    assert (Suspect(node(1), 1, node(3)), 0) in g.pending_broadcasts()
    g.receive(3.0, addr(4), encode([Suspect(node(1), 1, node(4))]))  # k reached: 1 + 4 s
    now, _ = run_until(g, 4.99, 3.0)
    assert g.member(node(1)).state is MemberState.SUSPECT  # type: ignore[union-attr]
    run_until(g, 5.0, now)
    assert kinds(g, node(1)) == [EventKind.DEAD]
    assert g.member(node(1)).state is MemberState.DEAD  # type: ignore[union-attr]
    assert Dead(node(1), 1, node(0)) in [b for b, _ in g.pending_broadcasts()]


def test_unconfirmed_suspicion_lasts_the_maximum_timeout() -> None:
    g = make(10)
    g.receive(1.0, addr(2), encode([Suspect(node(1), 1, node(2))]))
    now, _ = run_until(g, 24.99, 1.0)
    assert g.member(node(1)).state is MemberState.SUSPECT  # type: ignore[union-attr]
    run_until(g, 25.0, now)
    assert g.member(node(1)).state is MemberState.DEAD  # type: ignore[union-attr]


def test_without_lifeguard_the_timeout_is_fixed_at_the_minimum() -> None:
    g = make(10, LAN.replace(lifeguard=False))
    g.receive(1.0, addr(2), encode([Suspect(node(1), 1, node(2))]))
    now, _ = run_until(g, 4.99, 1.0)
    assert g.member(node(1)).state is MemberState.SUSPECT  # type: ignore[union-attr]
    run_until(g, 5.0, now)
    assert g.member(node(1)).state is MemberState.DEAD  # type: ignore[union-attr]


def test_refutation_cancels_the_suspicion() -> None:
    g = make(10)
    g.receive(1.0, addr(2), encode([Suspect(node(1), 1, node(2))]))
    g.receive(2.0, addr(1), encode([Alive(node(1), 2, addr(1), {})]))
    assert kinds(g, node(1)) == [EventKind.SUSPECT, EventKind.ALIVE]
    run_until(g, 60.0, 2.0)
    assert g.member(node(1)).state is MemberState.ALIVE  # type: ignore[union-attr]
    assert EventKind.DEAD not in kinds(g, node(1))


def test_a_leave_is_recorded_as_left_and_a_failure_as_dead() -> None:
    g = make(4)
    g.receive(1.0, addr(1), encode([Dead(node(1), 1, node(1)), Dead(node(2), 1, node(3))]))
    assert [(e.kind, e.member.id) for e in g.events()] == [
        (EventKind.LEFT, node(1)),
        (EventKind.DEAD, node(2)),
    ]
    # A member that left or died comes back with a higher incarnation (even from a new address).
    g.receive(2.0, ("10.9.9.9", 7481), encode([Alive(node(1), 2, ("10.9.9.9", 7481), {})]))
    assert kinds(g, node(1)) == [EventKind.JOINED]
    assert g.member(node(1)).addr == ("10.9.9.9", 7481)  # type: ignore[union-attr]


def test_an_alive_member_claimed_at_another_address_is_a_conflict() -> None:
    g = make(3)
    g.receive(1.0, addr(7), encode([Alive(node(1), 9, addr(7), {})]))
    assert g.member(node(1)).addr == addr(1)  # type: ignore[union-attr]
    assert g.stats["addr_conflicts"] == 1


def test_dead_and_left_members_are_reaped_after_their_timeouts() -> None:
    cfg = LAN.replace(reconnect_timeout=60.0, tombstone_timeout=30.0, reap_interval=5.0)
    g = make(4, cfg)
    g.receive(1.0, addr(1), encode([Dead(node(1), 1, node(1)), Dead(node(2), 1, node(3))]))
    g.events()
    now, _ = run_until(g, 30.0, 1.0)
    assert g.member(node(1)) is not None
    now, _ = run_until(g, 36.1, now)
    assert g.member(node(1)) is None and g.member(node(2)) is not None
    run_until(g, 66.1, now)
    assert g.member(node(2)) is None
    reaped = [e.member.id for e in g.events() if e.kind is EventKind.REAPED]
    assert reaped == [node(1), node(2)]
    assert {m.id for m in g.members()} == {node(0), node(3)}


def test_reconnect_attempts_push_pull_with_failed_members() -> None:
    cfg = LAN.replace(reconnect_interval=2.0, push_pull_interval=0.0)
    g = make(3, cfg)
    g.receive(1.0, addr(1), encode([Dead(node(1), 1, node(2))]))
    _, out = run_until(g, 40.0, 1.0)
    tries = [o for o in out if o.stream and isinstance(o.messages[0], PushPull)]
    assert tries and all(o.to == addr(1) and o.messages[0].join for o in tries)  # type: ignore[union-attr]
    assert g.stats["reconnects"] == len(tries)


# ------------------------------------------------------------------ probing


def _first_probe(g: Gossip) -> tuple[float, str, int]:
    now = 0.0
    while True:
        now = g.next_deadline()  # type: ignore[assignment]
        for _, msg in sent(g.tick(now)):
            if isinstance(msg, Ping):
                return now, msg.target, msg.seq


def test_probe_goes_indirect_then_suspects_and_counts_missed_nacks() -> None:
    g = make(6)
    start, target, seq = _first_probe(g)
    assert g.probing == target
    out = g.tick(start + LAN.probe_timeout)
    indirect = [(to, m) for to, m in sent(out) if isinstance(m, IndirectPing)]
    assert len(indirect) == LAN.indirect_checks
    assert all(m.target == target and m.seq == seq and m.nack for _, m in indirect)
    helpers = {to for to, _ in indirect}
    assert addr(0) not in helpers and len(helpers) == 3
    tcp = [o for o in out if o.stream]
    assert len(tcp) == 1 and tcp[0].messages == (Ping(seq, target),)
    assert tcp[0].deadline == pytest.approx(start + LAN.probe_interval)
    # Two of three helpers report a nack; the probe interval ends without an ack.
    g.receive(start + 0.7, next(iter(helpers)), encode([Nack(seq), Nack(seq)]))
    g.tick(start + LAN.probe_interval)
    assert kinds(g, target) == [EventKind.SUSPECT]
    assert g.health_score == 1  # one expected nack missing
    assert (Suspect(target, 1, node(0)), 0) in g.pending_broadcasts()


def test_successful_probe_improves_health() -> None:
    g = make(6)
    g.receive(0.0, addr(1), encode([Suspect(node(0), 1, node(1))]))  # refute: score 1
    assert g.health_score == 1
    start, target, seq = _first_probe(g)
    g.receive(start + 0.01, addr(int(target[1:])), encode([Ack(seq)]))
    assert g.health_score == 0 and g.probing is None


def test_unhealthy_member_stretches_its_probe_interval() -> None:
    g = make(6)
    for inc in range(1, 4):
        g.receive(0.0, addr(1), encode([Suspect(node(0), inc, node(1))]))
    assert g.health_score == 3
    start, target, _ = _first_probe(g)
    g.tick(start + LAN.probe_interval)  # a healthy member would have given up here
    assert g.probing == target
    g.tick(start + 4 * LAN.probe_interval)
    assert EventKind.SUSPECT in kinds(g, target)


def test_probing_a_suspect_carries_the_accusation_to_it() -> None:
    g = make(3)
    g.receive(0.0, addr(2), encode([Suspect(node(1), 1, node(2))]))
    now = 0.0
    for _ in range(10):
        now = g.next_deadline()  # type: ignore[assignment]
        out = g.tick(now)
        pings = [o for o in out if not o.stream and isinstance(o.messages[0], Ping)]
        if pings and pings[0].to == addr(1):
            assert pings[0].messages == (
                Ping(pings[0].messages[0].seq, node(1)),
                Suspect(node(1), 1, node(0)),
            )  # type: ignore[union-attr]
            return
        for o in pings:  # answer probes of the other member
            g.receive(now, o.to, encode([Ack(o.messages[0].seq)]))  # type: ignore[union-attr]
    pytest.fail("never probed the suspect")


def test_indirect_ping_is_relayed_with_ack_or_nack() -> None:
    g = make(3)
    out = g.receive(1.0, addr(1), encode([IndirectPing(77, node(2), addr(2), True)]))
    ((to, ping),) = sent(out)
    assert to == addr(2) and isinstance(ping, Ping) and ping.target == node(2)
    out = g.receive(1.1, addr(2), encode([Ack(ping.seq)]))
    assert sent(out)[0] == (addr(1), Ack(77))
    # No answer this time: a nack when the probe timeout passes.
    out = g.receive(2.0, addr(1), encode([IndirectPing(78, node(2), addr(2), True)]))
    assert g.tick(2.0 + LAN.probe_timeout - 0.01) == [] or all(
        not isinstance(m, Nack) for _, m in sent(g.tick(2.0))
    )
    out = g.tick(2.0 + LAN.probe_timeout)
    assert (addr(1), Nack(78)) in sent(out)


def test_ping_is_acked_with_piggybacked_broadcasts_within_the_datagram_budget() -> None:
    g = make(2)
    big = {"blob": "x" * 500}
    for i in range(10, 20):  # ten new members with bulky metadata: ten queued broadcasts
        g.receive(0.5, addr(i), encode([Alive(node(i), 1, addr(i), big)]))
    out = g.receive(1.0, addr(1), encode([Ping(5, node(0))]))
    assert out[0].to == addr(1) and out[0].messages[0] == Ack(5)
    assert len(out[0].messages) > 1  # broadcasts rode along
    assert len(out[0].data) <= LAN.udp_buffer_size
    assert decode(out[0].data) == out[0].messages
    # A ping meant for someone else (a reused address) is not acked.
    assert g.receive(1.0, addr(1), encode([Ping(6, "someone-else")])) == []
    _, rest = run_until(g, 10.0, 1.0)
    assert all(len(o.data) <= LAN.udp_buffer_size for o in rest if not o.stream)


# ------------------------------------------------------------------ metadata, push/pull, streams


def test_update_meta_bumps_the_incarnation_and_broadcasts() -> None:
    g = make(3)
    inc = g.incarnation
    g.update_meta({"gpus": "8xH100", "health": "degraded"})
    assert g.incarnation == inc + 1
    assert (Alive(node(0), inc + 1, addr(0), {"gpus": "8xH100", "health": "degraded"}), 0) in (
        g.pending_broadcasts()
    )
    assert kinds(g, node(0)) == [EventKind.UPDATED]
    g.update_meta({"gpus": "8xH100", "health": "degraded"})  # no change, no broadcast
    assert g.incarnation == inc + 1
    with pytest.raises(MetaTooLarge):
        g.update_meta({"blob": "x" * 2000})
    with pytest.raises(TypeError):
        g.update_meta({"bad": object()})


def test_merging_remote_state_trusts_alive_and_left_but_only_suspects_dead() -> None:
    g = make(4)
    state = PushPull(
        (
            MemberRecord(node(1), addr(1), 1, MemberState.DEAD, {}),
            MemberRecord(node(2), addr(2), 1, MemberState.LEFT, {}),
            MemberRecord(node(9), addr(9), 4, MemberState.ALIVE, {"new": 1}),
            MemberRecord(node(8), addr(8), 4, MemberState.DEAD, {}),  # unknown and dead: ignored
        )
    )
    g.merge_remote_state(1.0, state)
    assert [(e.kind, e.member.id) for e in g.events()] == [
        (EventKind.SUSPECT, node(1)),
        (EventKind.LEFT, node(2)),
        (EventKind.JOINED, node(9)),
    ]
    assert g.member(node(8)) is None


def test_stream_exchanges_answer_ping_and_push_pull() -> None:
    g = make(2)
    reply = g.receive_stream(1.0, addr(5), encode([Ping(3, node(0))]))
    assert reply is not None and decode(reply) == (Ack(3),)
    joiner = PushPull((MemberRecord(node(5), addr(5), 1, MemberState.ALIVE, {}),), join=True)
    reply = g.receive_stream(1.0, addr(5), encode([joiner]))
    (answer,) = decode(reply)  # type: ignore[arg-type]
    assert isinstance(answer, PushPull) and answer.reply and answer.join
    # The answer is our view before the merge: it does not echo the joiner back.
    assert {r.member for r in answer.members} == {node(0), node(1)}
    assert g.member(node(5)) is not None
    with pytest.raises(DecodeError):
        g.receive_stream(1.0, addr(5), encode([Ack(1)]))


def test_garbage_is_refused_and_changes_nothing() -> None:
    g = make(3)
    before = g.members()
    with pytest.raises(DecodeError):
        g.receive(1.0, addr(1), b"\x01\x92\x03")
    with pytest.raises(DecodeError):
        g.receive_stream(1.0, addr(1), b"GET / HTTP/1.1\r\n")
    assert g.members() == before


# ------------------------------------------------------------------ leaving


def test_leave_broadcasts_a_self_verdict_and_finishes() -> None:
    g = make(5)
    g.tick(0.0)
    inc = g.incarnation
    out = g.leave(1.0)
    assert g.left and not g.leave_done
    assert any(m == Dead(node(0), inc, node(0)) for _, m in sent(out))  # sent at once
    assert kinds(g, node(0)) == [EventKind.LEFT]
    # Alive or suspicion about itself no longer matters.
    g.receive(
        1.5, addr(1), encode([Suspect(node(0), inc, node(1)), Alive(node(0), inc + 5, addr(0), {})])
    )
    assert g.incarnation == inc and g.member(node(0)).state is MemberState.LEFT  # type: ignore[union-attr]
    now, out = run_until(g, 30.0, 1.5)
    assert g.leave_done
    assert not any(isinstance(m, Ping) for _, m in sent(out))  # it stopped probing
    assert g.leave(now) == []


def test_leaving_alone_is_done_at_once() -> None:
    g = make(1)
    g.leave(0.0)
    assert g.leave_done


def test_same_seed_same_behaviour() -> None:
    def run() -> list[bytes]:
        g = make(8, seed=42)
        _, out = run_until(g, 20.0, 0.0)
        return [o.data for o in out]

    assert run() == run()


def test_identity_and_metadata_must_fit_a_datagram() -> None:
    with pytest.raises(ConfigError):
        Gossip("", addr(0))
    with pytest.raises(ConfigError):
        Gossip("x" * 300, addr(0))
    # Within meta_max_size, but with a long id and host the alive message would not fit.
    long = "h" * 250
    with pytest.raises(MetaTooLarge):
        Gossip("n" * 200, (long, 1), {"blob": "x" * 1000})
    Gossip("n0", addr(0), {"blob": "x" * 1000})
