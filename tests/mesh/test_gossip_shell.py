"""The trio gossip shell on loopback: real UDP sockets, streams over the Raft transport, sealed
datagrams. Real clock (sockets do real I/O); every wait polls a condition under a deadline."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from consensus.transport import ClusterCA, TLSConfig, Transport, write_node_files
from meshgpu.mesh.gossip import (
    Addr,
    Alive,
    ConfigError,
    DecodeError,
    Gossip,
    GossipConfig,
    Keyring,
    MemberState,
    Suspect,
    encode,
    new_key,
)
from meshgpu.mesh.gossip.keyring import OVERHEAD
from meshgpu.mesh.gossip.shell import GossipShell, TransportStreams

LOCALHOST = "127.0.0.1"
CLUSTER = "cluster-under-test"
KEY = new_key()
# Fast enough for a test, slow enough that a loaded CI machine does not miss probe deadlines.
FAST = GossipConfig.local().replace(
    probe_interval=0.3,
    probe_timeout=0.1,
    gossip_interval=0.05,
    push_pull_interval=2.0,
    tcp_timeout=1.0,
    reconnect_interval=1.0,
    gossip_to_the_dead_time=5.0,
)
DEADLINE = 20.0


@dataclass
class Member:
    index: int
    transport: Transport
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    shell: GossipShell = None  # type: ignore[assignment]  # set once running

    @property
    def id(self) -> str:
        return f"n{self.index}"

    @property
    def addr(self) -> Addr:
        return (LOCALHOST, self.transport.port)

    def state_of(self, other: Member) -> MemberState | None:
        info = self.shell.member(other.id)
        return None if info is None else info.state


@dataclass
class Mesh:
    nursery: trio.Nursery
    tls: Callable[[int], TLSConfig] | None = None
    members: list[Member] = field(default_factory=list)
    book: dict[Addr, int] = field(default_factory=dict)  # gossip address -> transport id

    async def add(
        self, *, key: bytes = KEY, leave_on_exit: bool = False, meta: dict | None = None
    ) -> Member:
        i = len(self.members) + 1
        member: Member

        async def on_request(peer: int, body: bytes) -> bytes:
            return member.shell.handle_stream(body)

        transport = Transport(
            i,
            on_messages=lambda msgs: None,
            on_request=on_request,
            host=LOCALHOST,
            tls=self.tls(i) if self.tls else None,
            plaintext=self.tls is None,
        )
        member = Member(i, transport)
        await self.nursery.start(self._run, member, key, leave_on_exit, meta)
        self.members.append(member)
        return member

    async def _run(
        self,
        member: Member,
        key: bytes,
        leave_on_exit: bool,
        meta: dict | None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with member.scope:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(member.transport.run)
                self.book[(LOCALHOST, port)] = member.index
                core = Gossip(
                    member.id,
                    (LOCALHOST, port),
                    meta or {"gpus": "2xH100"},
                    FAST,
                    random.Random(member.index),
                )
                member.shell = GossipShell(
                    core,
                    Keyring([key], CLUSTER),
                    TransportStreams(member.transport, self.book.get),
                    host=LOCALHOST,
                    port=port,
                    leave_on_exit=leave_on_exit,
                )
                await nursery.start(member.shell.run)
                task_status.started()


@asynccontextmanager
async def mesh(tls: Callable[[int], TLSConfig] | None = None) -> AsyncIterator[Mesh]:
    async with trio.open_nursery() as nursery:
        yield Mesh(nursery, tls)
        nursery.cancel_scope.cancel()


async def until(predicate: Callable[[], object], timeout: float = DEADLINE) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def sees_all_alive(observer: Member, members: list[Member]) -> bool:
    return all(observer.state_of(m) is MemberState.ALIVE for m in members)


async def send_raw(to: Addr, data: bytes) -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.sendto(data, to)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], TLSConfig]:
    ca = ClusterCA.create("gossip test CA")
    root: Path = tmp_path_factory.mktemp("gossip-pki")
    cache: dict[int, TLSConfig] = {}

    def config(i: int) -> TLSConfig:
        if i not in cache:
            files = write_node_files(root / str(i), ca.cert_pem(), ca.issue_node_certificate(i))
            cache[i] = TLSConfig.from_files(files)
        return cache[i]

    return config


# ------------------------------------------------------------------------------------------
# The keyring


def test_keyring_seals_for_one_cluster_and_opens_with_any_key_of_the_ring() -> None:
    old, new = new_key(), new_key()
    sealed_old = Keyring([old], CLUSTER).seal(b"packet")
    assert len(sealed_old) == len(b"packet") + OVERHEAD
    rotated = Keyring([new, old], CLUSTER)
    assert rotated.open(sealed_old) == b"packet"  # a member that has not rotated yet
    assert Keyring([new], CLUSTER).open(rotated.seal(b"x")) == b"x"  # sealed with the primary
    for bad in (
        Keyring([new], CLUSTER).seal(b"packet"),  # a key this ring does not hold
        Keyring([old], "another-cluster").seal(b"packet"),  # same key, other cluster
        sealed_old[:-1] + bytes([sealed_old[-1] ^ 1]),  # one flipped bit
        sealed_old[: OVERHEAD - 1],  # truncated
        b"\x02" + sealed_old[1:],  # unknown version
    ):
        with pytest.raises(DecodeError):
            Keyring([old], CLUSTER).open(bad)
    with pytest.raises(ConfigError):
        Keyring([], CLUSTER)
    with pytest.raises(ConfigError):
        Keyring([b"short"], CLUSTER)


def test_config_spec_picks_a_profile_and_changes_knobs() -> None:
    assert GossipConfig.from_spec("lan") == GossipConfig.lan()
    cfg = GossipConfig.from_spec("local, probe_interval=0.3,probe_timeout=0.1,lifeguard=false")
    assert (cfg.probe_interval, cfg.probe_timeout, cfg.lifeguard) == (0.3, 0.1, False)
    assert cfg.suspicion_mult == GossipConfig.local().suspicion_mult
    assert GossipConfig.from_spec("wan,indirect_checks=5").indirect_checks == 5
    for bad in ("moon", "lan,nope=1", "lan,probe_interval", "lan,indirect_checks=x"):
        with pytest.raises(ConfigError):
            GossipConfig.from_spec(bad)
    with pytest.raises(ConfigError):  # validated: a timeout longer than the interval
        GossipConfig.from_spec("lan,probe_timeout=5")


# ------------------------------------------------------------------------------------------
# Shells on loopback


async def test_members_join_through_one_seed_over_mutual_tls(
    tls: Callable[[int], TLSConfig],
) -> None:
    async with mesh(tls) as m:
        seed = await m.add(meta={"name": "seed"})
        others = [await m.add(meta={"name": f"m{i}"}) for i in range(3)]
        for member in others:
            member.shell.join([seed.addr])
        everyone = [seed, *others]
        await until(lambda: all(sees_all_alive(x, everyone) for x in everyone))
        # Metadata travels with membership, and the join used streams (push/pull over mTLS).
        assert seed.shell.member(others[2].id).meta == {"name": "m2"}  # type: ignore[union-attr]
        assert all(x.shell.stats["streams_out"] >= 1 for x in others)
        assert seed.transport.stats.requests_received >= 3
        assert all(x.shell.stats["bad_auth"] == 0 for x in everyone)
        # A metadata change reaches everyone.
        others[0].shell.update_meta({"name": "m0", "busy": [1]})
        await until(
            lambda: all(
                x.shell.member(others[0].id).meta.get("busy") == [1]  # type: ignore[union-attr]
                for x in everyone
            )
        )


async def test_a_crashed_member_is_declared_dead_by_everyone() -> None:
    async with mesh() as m:
        members = [await m.add() for _ in range(4)]
        for member in members[1:]:
            member.shell.join([members[0].addr])
        await until(lambda: all(sees_all_alive(x, members) for x in members))
        victim, survivors = members[3], members[:3]
        victim.scope.cancel()  # no leave: it just stops answering
        await until(lambda: all(x.state_of(victim) is MemberState.DEAD for x in survivors))
        assert all(sees_all_alive(x, survivors) for x in survivors)


async def test_a_graceful_leave_is_seen_as_left_not_dead() -> None:
    async with mesh() as m:
        members = [await m.add(leave_on_exit=True) for _ in range(3)]
        for member in members[1:]:
            member.shell.join([members[0].addr])
        await until(lambda: all(sees_all_alive(x, members) for x in members))
        leaver = members[2]
        leaver.scope.cancel()
        await until(lambda: all(x.state_of(leaver) is MemberState.LEFT for x in members[:2]))


async def test_a_falsely_suspected_member_refutes() -> None:
    async with mesh() as m:
        members = [await m.add() for _ in range(3)]
        for member in members[1:]:
            member.shell.join([members[0].addr])
        await until(lambda: all(sees_all_alive(x, members) for x in members))
        target, accuser = members[1], members[0]
        before = target.shell.core.incarnation
        # A (sealed, so authentic) suspicion of a healthy member, as a lossy network would cause.
        rumour = encode([Suspect(target.id, before, members[2].id)])
        await send_raw(accuser.addr, accuser.shell.keyring.seal(rumour))
        await until(lambda: target.shell.core.stats["refutes"] >= 1)
        assert target.shell.core.incarnation > before
        await until(
            lambda: all(
                (info := x.shell.member(target.id)) is not None
                and info.state is MemberState.ALIVE
                and info.incarnation == target.shell.core.incarnation
                for x in members
            )
        )
        assert not any(x.shell.core.stats["deaths"] for x in members)


async def test_packets_without_the_cluster_key_are_dropped_and_counted() -> None:
    async with mesh() as m:
        a = await m.add()
        b = await m.add()
        b.shell.join([a.addr])
        await until(lambda: sees_all_alive(a, [a, b]) and sees_all_alive(b, [a, b]))
        intruder = encode([Alive("intruder", 99, (LOCALHOST, 9), {"evil": True})])
        bad_auth = [
            b"\x00garbage",
            intruder,  # a well-formed gossip packet, but not sealed
            Keyring([new_key()], CLUSTER).seal(intruder),  # sealed with a key of its own
            Keyring([KEY], "another-cluster").seal(intruder),  # another cluster's packet
        ]
        for data in bad_auth:
            await send_raw(a.addr, data)
        # Authentic but malformed: the member's own bug or a newer version; counted too.
        await send_raw(a.addr, a.shell.keyring.seal(b"\x01\x91\xc1"))
        await until(
            lambda: a.shell.stats["bad_auth"] == len(bad_auth) and a.shell.stats["bad_packets"] == 1
        )
        assert a.shell.member("intruder") is None
        # A garbage stream packet gets no answer; the member carries on.
        assert a.shell.handle_stream(b"junk") == b""
        assert a.shell.stats["bad_stream_packets"] == 1
        before = b.shell.stats["datagrams_in"]
        await until(lambda: b.shell.stats["datagrams_in"] > before + 3)  # probes still flow
        assert sees_all_alive(a, [a, b]) and sees_all_alive(b, [a, b])


async def test_a_member_with_another_key_cannot_join() -> None:
    async with mesh() as m:
        a = await m.add()
        b = await m.add()
        outsider = await m.add(key=new_key())
        b.shell.join([a.addr])
        await until(lambda: sees_all_alive(a, [a, b]))
        # Its datagrams never open. (Its stream would -- the transport, not the key, guards
        # streams: in the agent only holders of a cluster certificate get that far.)
        await send_raw(a.addr, outsider.shell.keyring.seal(encode([Alive("x", 1, ("h", 1))])))
        await until(lambda: a.shell.stats["bad_auth"] >= 1)
        assert a.shell.member("x") is None


async def test_rotating_keys_keeps_the_mesh_together() -> None:
    async with mesh() as m:
        members = [await m.add() for _ in range(3)]
        for member in members[1:]:
            member.shell.join([members[0].addr])
        await until(lambda: all(sees_all_alive(x, members) for x in members))
        new = new_key()
        for member in members:  # one by one, as each applies the rotation command
            member.shell.set_keyring(Keyring([new, KEY], CLUSTER))
        base = {x.id: x.shell.stats["datagrams_in"] for x in members}
        await until(lambda: all(x.shell.stats["datagrams_in"] > base[x.id] + 5 for x in members))
        # Everyone seals with the new key now: a member holding only it understands them all.
        for member in members:
            member.shell.set_keyring(Keyring([new], CLUSTER))
        base = {x.id: x.shell.stats["datagrams_in"] for x in members}
        await until(lambda: all(x.shell.stats["datagrams_in"] > base[x.id] + 5 for x in members))
        assert all(sees_all_alive(x, members) for x in members)


async def test_an_idle_shell_sleeps_until_its_next_timer() -> None:
    async with mesh() as m:
        a = await m.add()
        b = await m.add()
        b.shell.join([a.addr])
        await until(lambda: sees_all_alive(a, [a, b]))
        start, ticks = trio.current_time(), a.shell.stats["ticks"]
        await trio.sleep(1.0)
        elapsed = trio.current_time() - start
        # Timers fire a few times per gossip interval at most; a loop that woke itself up
        # would tick thousands of times. (A slow machine only ticks less.)
        per_second = (a.shell.stats["ticks"] - ticks) / elapsed
        assert 0 < per_second < 10 / FAST.gossip_interval
