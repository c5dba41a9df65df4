"""The peer protocol (meshgpu/peer): frames, the mux shared with gossip, limits, timeouts and
the member check, over an in-memory stream pair; then the same calls over the real mutual-TLS
transport, where a host without a cluster certificate never reaches a handler."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from consensus.transport import (
    ClusterCA,
    TLSConfig,
    Transport,
    TransportConfig,
    TransportError,
    write_node_files,
)
from meshgpu.errors import (
    Denied,
    Invalid,
    MeshError,
    NotFound,
    Remote,
    TooLarge,
    Unavailable,
    run_not_found,
)
from meshgpu.peer import PeerClient, PeerHandlers, PeerServer, wire
from meshgpu.peer import server as server_mod
from meshgpu.peer.wire import Kind, ProtocolError

ARCHIVE = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit: several chunks
SHA = hashlib.sha256(ARCHIVE).hexdigest()


class Host:
    """What one member answers with, recording what it was asked."""

    def __init__(self, tmp_path: Path, members: set[int]) -> None:
        self.members = members
        self.dir = tmp_path
        (tmp_path / f"{SHA}.tar.gz").write_bytes(ARCHIVE)
        self.stored: dict[str, bytes] = {}
        self.gossip_seen: list[tuple[int, bytes]] = []
        self.log_lines: trio.MemoryReceiveChannel[bytes] | None = None

    def handlers(self, code_limit: int = 8 << 20) -> PeerHandlers:
        async def gossip(peer: int, body: bytes) -> bytes:
            self.gossip_seen.append((peer, body))
            return b"\x01gossip-reply"

        def code_path(sha: str) -> Path | None:
            p = self.dir / f"{sha}.tar.gz"
            return p if p.exists() else None

        async def code_put(data: bytes, sha: str) -> str:
            self.stored[sha] = data
            return hashlib.sha256(data).hexdigest()

        async def logs(run: str, job: int, follow: bool) -> AsyncIterator[bytes]:
            if run == "nope":
                raise run_not_found(run)
            yield b"line 1\n"
            if follow and self.log_lines is not None:
                async for line in self.log_lines:
                    yield line

        async def metrics(run: str, job: int | None) -> dict[str, Any]:
            return {"run": run, "jobs": [{"job_num": job, "error": None}]}

        async def admit(body: dict[str, Any]) -> dict[str, Any]:
            if body.get("bad"):
                raise Denied("join refused", "x", "t")
            if body.get("remote"):
                raise Remote(418, "forwarded", "y", "z")
            if body.get("crash"):
                raise RuntimeError("a bug")
            return {"raft_id": 7, "echo": body}

        return PeerHandlers(
            is_member=lambda rid: rid in self.members,
            gossip=gossip,
            code_path=code_path,
            code_put=code_put,
            code_limit=code_limit,
            logs=logs,
            metrics=metrics,
            admit=admit,
        )


class MemoryTransport:
    """``open_stream`` as the real transport has it, served by ``server`` in memory."""

    def __init__(self, nursery: trio.Nursery, server: PeerServer, me: int = 1) -> None:
        self.nursery, self.server, self.me = nursery, server, me
        self.last: wire.MemoryChannel | None = None

    @asynccontextmanager
    async def open_stream(
        self, peer_id: int, *, address: Any = None
    ) -> AsyncIterator[wire.MemoryChannel]:
        a, b = wire.memory_pair(self.me, peer_id)
        self.last = b

        async def serve() -> None:
            try:
                await self.server.handle(self.me, b)
            finally:
                await b.aclose()

        self.nursery.start_soon(serve)
        try:
            yield a
        finally:
            await a.aclose()


def client_for(transport: Any, **kw: Any) -> PeerClient:
    return PeerClient(lambda: transport, lambda node: (2, ("127.0.0.1", 1)), **kw)


# -- frames -------------------------------------------------------------------------------------


def test_frames_round_trip_and_garbage_is_refused() -> None:
    kind, payload = wire.parse(wire.encode_call("code.get", {"sha": SHA}))
    assert kind is Kind.CALL and wire.decode_call(payload) == ("code.get", {"sha": SHA})
    err = wire.decode_error(wire.parse(wire.encode_error(NotFound("t", "d", "c")))[1])
    assert type(err) is NotFound and (err.title, err.detail, err.code) == ("t", "d", "c")
    err = wire.decode_error(wire.parse(wire.encode_error(Remote(409, "t", "d", "c")))[1])
    assert type(err) is Remote and (err.status, err.title, err.code) == (409, "t", "c")
    err = wire.decode_error(wire.parse(wire.encode_error(MeshError("t")))[1])
    assert type(err) is Remote and err.status == 500  # no known kind
    assert isinstance(
        wire.decode_error(wire.parse(wire.encode_error(ProtocolError("x")))[1]), Invalid
    )
    assert not wire.is_peer_body(b"\x01gossip") and wire.is_peer_body(wire.frame(Kind.END))
    for bad in (b"", b"\xa7", b"\xa7\x09", b"\x01\x01"):
        with pytest.raises(ProtocolError):
            wire.parse(bad)
    for bad_call in (b"\xc1", b"\x91\x01", b"\x92\x01\x80"):
        with pytest.raises(ProtocolError):
            wire.decode_call(bad_call)


# -- calls in memory ------------------------------------------------------------------------------


async def test_an_archive_travels_in_bounded_chunks_and_a_cap_stops_it(tmp_path: Path) -> None:
    host = Host(tmp_path, {1})
    server = PeerServer(host.handlers())
    async with trio.open_nursery() as n:
        t = MemoryTransport(n, server)
        client = client_for(t)
        assert await client.fetch_code("b", SHA, len(ARCHIVE), timeout=5) == ARCHIVE
        # CALL+END went one way; the reply came as ceil(size/CHUNK) DATA frames and an END.
        assert t.last is not None and t.last.sent == math.ceil(len(ARCHIVE) / wire.CHUNK) + 1
        with pytest.raises(TooLarge) as e:
            await client.fetch_code("b", SHA, len(ARCHIVE) - 1, timeout=5)
        assert e.value.code == "too_large"
        with pytest.raises(NotFound):
            await client.fetch_code("b", "0" * 64, 1 << 30, timeout=5)
        # A push is a request body, held to the callee's code limit.
        assert await client.push_code("b", SHA, ARCHIVE, timeout=5) == SHA
        assert host.stored == {SHA: ARCHIVE}
    small = PeerServer(host.handlers(code_limit=1000))
    async with trio.open_nursery() as n:
        with pytest.raises(TooLarge):
            await client_for(MemoryTransport(n, small)).push_code("b", SHA, ARCHIVE, timeout=5)


async def test_a_reader_that_stops_reading_holds_the_writer_back(tmp_path: Path) -> None:
    host = Host(tmp_path, {1})
    server = PeerServer(host.handlers())
    async with trio.open_nursery() as n:
        t = MemoryTransport(n, server)
        async with t.open_stream(2) as ch:
            await ch.send(wire.encode_call("code.get", {"sha": SHA}))
            await wire.send_end(ch)
            await trio.sleep(0.2)  # the server would send 5 frames; it has sent what fits
            assert t.last is not None and t.last.sent <= 2
            assert await wire.read_body(ch, idle=5, cap=len(ARCHIVE)) == ARCHIVE


async def test_gossip_shares_the_stream_handler_by_its_first_byte(tmp_path: Path) -> None:
    host = Host(tmp_path, set())  # gossip is not held to the member check (joining hosts)
    server = PeerServer(host.handlers())
    async with trio.open_nursery() as n, MemoryTransport(n, server).open_stream(2) as ch:
        await ch.send(b"\x01push-pull")
        assert await ch.receive(timeout=5) == b"\x01gossip-reply"
    assert host.gossip_seen == [(1, b"\x01push-pull")] and server.stats["gossip"] == 1


async def test_a_caller_that_is_not_a_current_member_is_refused(tmp_path: Path) -> None:
    host = Host(tmp_path, {5})  # caller 1 is not (or no longer) a member
    server = PeerServer(host.handlers())
    async with trio.open_nursery() as n:
        client = client_for(MemoryTransport(n, server))
        for call in (
            client.fetch_code("b", SHA, 1 << 30, timeout=5),
            client.push_code("b", SHA, ARCHIVE, timeout=5),
            client.metrics("b", "r", 0, timeout=5),
            client.join("b", {}, timeout=5),
        ):
            with pytest.raises(Denied) as e:
                await call
            assert e.value.code == "denied"
    assert host.stored == {} and server.stats["refused"] == 4


async def test_logs_follow_with_keepalives_and_refusals_keep_their_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_mod, "KEEPALIVE_S", 0.05)
    host = Host(tmp_path, {1})
    send, host.log_lines = trio.open_memory_channel[bytes](0)
    server = PeerServer(host.handlers())
    async with trio.open_nursery() as n:
        client = client_for(MemoryTransport(n, server), follow_idle=0.5)
        assert [c async for c in client.logs("b", "r", 0, False)] == [b"line 1\n"]
        got: list[bytes] = []

        async def writer() -> None:
            await trio.sleep(0.6)  # longer than the caller's idle limit: keepalives carry it
            await send.send(b"line 2\n")
            await send.aclose()

        n.start_soon(writer)
        async for chunk in client.logs("b", "r", 0, True):
            got.append(chunk)
        assert got == [b"line 1\n", b"line 2\n"]
        with pytest.raises(NotFound) as e:
            [c async for c in client.logs("b", "nope", 0, False)]
        assert (e.value.title, e.value.code) == ("run not found", "not_found")
        assert await client.metrics("b", "r", 3, timeout=5) == {
            "run": "r",
            "jobs": [{"job_num": 3, "error": None}],
        }
        assert (await client.join("b", {"x": 1}, timeout=5))["echo"] == {"x": 1}
        with pytest.raises(Denied) as e:
            await client.join("b", {"bad": True}, timeout=5)
        assert (e.value.title, e.value.detail, e.value.code) == ("join refused", "x", "t")
        with pytest.raises(Remote) as e:
            await client.join("b", {"remote": True}, timeout=5)
        assert (e.value.status, e.value.title, e.value.code) == (418, "forwarded", "z")
        with pytest.raises(Remote) as e:
            await client.join("b", {"crash": True}, timeout=5)
        assert (e.value.status, e.value.code) == (500, "internal")


async def test_a_silent_callee_times_out_and_garbage_is_answered_with_an_error(
    tmp_path: Path,
) -> None:
    host = Host(tmp_path, {1})
    server = PeerServer(host.handlers())

    async def hang(run: str, job: int | None) -> dict[str, Any]:
        await trio.sleep_forever()
        raise AssertionError

    server.h = dataclasses.replace(server.h, metrics=hang)
    async with trio.open_nursery() as n:
        t = MemoryTransport(n, server)
        client = client_for(t)
        with trio.fail_after(5):
            with pytest.raises(Unavailable) as e:
                await client.metrics("b", "r", 0, timeout=0.2)
        assert e.value.code == "unavailable"
        async with t.open_stream(2) as ch:
            await ch.send(wire.frame(Kind.DATA, b"no call first"))
            with pytest.raises(Invalid) as e:
                await wire.read_result(ch, idle=5)
            assert e.value.code == "bad_peer_frame"
        async with t.open_stream(2) as ch:
            await ch.send(wire.encode_call("rm -rf", {}))
            with pytest.raises(NotFound) as e:
                await wire.read_result(ch, idle=5)
            assert e.value.code == "unknown_op"
        n.cancel_scope.cancel()


async def test_calls_over_the_limit_are_answered_busy(tmp_path: Path) -> None:
    host = Host(tmp_path, {1})
    server = PeerServer(host.handlers(), max_streams=0)
    async with trio.open_nursery() as n:
        with pytest.raises(Unavailable):
            await client_for(MemoryTransport(n, server)).metrics("b", "r", 0, timeout=5)
    assert server.stats["busy"] == 1


# -- over the mutual-TLS transport ------------------------------------------------------------------


def _tls(ca: ClusterCA, root: Path, node_id: int) -> TLSConfig:
    files = write_node_files(root / str(node_id), ca.cert_pem(), ca.issue_node_certificate(node_id))
    return TLSConfig.from_files(files)


async def _noop(msgs: list[Any]) -> None:
    pass


async def test_over_the_peer_port_only_cluster_certificates_get_through(tmp_path: Path) -> None:
    ca, other = ClusterCA.create("cluster"), ClusterCA.create("impostor")
    host = Host(tmp_path, {1})
    server = PeerServer(host.handlers())
    cfg = TransportConfig(connect_timeout=2.0)
    async with trio.open_nursery() as n:
        b = Transport(
            2, on_messages=_noop, on_stream=server.handle, tls=_tls(ca, tmp_path, 2), config=cfg
        )
        port = await n.start(b.run)
        a = Transport(1, on_messages=_noop, tls=_tls(ca, tmp_path, 1), config=cfg)
        await n.start(a.run)
        where = (2, ("127.0.0.1", port))
        client = PeerClient(lambda: a, lambda node: where)
        assert await client.fetch_code("b", SHA, 1 << 30, timeout=10) == ARCHIVE
        assert [c async for c in client.logs("b", "r", 0, False)] == [b"line 1\n"]
        # Gossip's one-shot requests still work on the same handler.
        assert await a.request(2, b"\x01ping", address=where[1], timeout=10) == b"\x01gossip-reply"
        # A host whose certificate another CA signed (no cluster certificate) never gets in.
        intruder = Transport(1, on_messages=_noop, tls=_tls(other, tmp_path / "x", 1), config=cfg)
        await n.start(intruder.run)
        with pytest.raises(Unavailable):
            await PeerClient(lambda: intruder, lambda node: where).fetch_code(
                "b", SHA, 1 << 30, timeout=10
            )
        with pytest.raises(TransportError):
            await intruder.request(2, b"\x01ping", address=where[1], timeout=10)
        assert server.stats["calls"] == 2 and host.gossip_seen == [(1, b"\x01ping")]
        # A member's valid certificate, once it is removed, is refused by the handlers.
        host.members.clear()
        with pytest.raises(Denied):
            await client.fetch_code("b", SHA, 1 << 30, timeout=10)
        n.cancel_scope.cancel()
