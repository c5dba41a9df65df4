"""The trio transport over real loopback sockets with mutual TLS.

Real clock throughout (sockets and TLS do real I/O; the autojump clock would fire timeouts while
the kernel works). Every wait is on an event under ``trio.fail_after``; the only loops that
resend are the ones that model Raft's own retransmission while a peer is down.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from consensus.core.types import (
    ConfState,
    Entry,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)
from consensus.transport import (
    ClusterCA,
    NodeTLSFiles,
    PeerIdentityError,
    PeerState,
    TLSConfig,
    Transport,
    TransportConfig,
    TransportError,
    client_context,
    codec,
    node_id_from_name,
    node_name,
    write_node_files,
)
from consensus.transport.backoff import Backoff
from consensus.transport.bench import bench_codec, bench_loopback
from consensus.transport.codec import StreamKind
from consensus.transport.tcp import parse_address

MT = MessageType
LOCALHOST = "127.0.0.1"
TIMEOUT = 10

# Tests redial quickly; production defaults are in TransportConfig.
FAST = TransportConfig(backoff_initial=0.01, backoff_max=0.1, connect_timeout=2.0)


# ------------------------------------------------------------------------------------------
# PKI fixtures: one cluster CA for the module, plus an impostor CA


@dataclass
class PKI:
    ca: ClusterCA
    root: Path
    files: dict[int, NodeTLSFiles] = field(default_factory=dict)
    configs: dict[int, TLSConfig] = field(default_factory=dict)

    def node_files(self, node_id: int) -> NodeTLSFiles:
        if node_id not in self.files:
            cert = self.ca.issue_node_certificate(node_id)
            self.files[node_id] = write_node_files(
                self.root / str(node_id), self.ca.cert_pem(), cert
            )
        return self.files[node_id]

    def tls(self, node_id: int) -> TLSConfig:
        if node_id not in self.configs:
            self.configs[node_id] = TLSConfig.from_files(self.node_files(node_id))
        return self.configs[node_id]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(ClusterCA.create("test cluster CA"), tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def impostor_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(ClusterCA.create("impostor CA"), tmp_path_factory.mktemp("impostor"))


# ------------------------------------------------------------------------------------------
# Test harness: a transport with recording callbacks


class Inbox:
    """Records what a transport delivers; lets a test wait for a condition on it."""

    def __init__(self, gate: trio.Event | None = None) -> None:
        self.batches: list[list[Message]] = []
        self._changed = trio.Event()
        # When given, each delivery is recorded and then waits for it: a node whose inbox
        # is full after the first batch.
        self._gate = gate

    @property
    def msgs(self) -> list[Message]:
        return [m for batch in self.batches for m in batch]

    async def __call__(self, msgs: list[Message]) -> None:
        self.batches.append(msgs)
        self._notify()
        if self._gate is not None:
            await self._gate.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()


@dataclass
class Node:
    transport: Transport
    inbox: Inbox
    reports: Inbox  # unreachable and snapshot reports, as fake messages for uniform waiting
    unreachable: list[int] = field(default_factory=list)
    snapshot_status: list[tuple[int, bool]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.transport.port


async def start_node(
    nursery: trio.Nursery,
    node_id: int,
    tls: TLSConfig | None,
    peers: dict[int, tuple[str, int]] | None = None,
    *,
    port: int = 0,
    config: TransportConfig = FAST,
    inbox: Inbox | None = None,
) -> Node:
    inbox = inbox if inbox is not None else Inbox()
    reports = Inbox()
    node: Node

    def on_unreachable(peer: int) -> None:
        node.unreachable.append(peer)
        reports._notify()

    def on_snapshot_status(peer: int, ok: bool) -> None:
        node.snapshot_status.append((peer, ok))
        reports._notify()

    transport = Transport(
        node_id,
        on_messages=inbox,
        on_unreachable=on_unreachable,
        on_snapshot_status=on_snapshot_status,
        host=LOCALHOST,
        port=port,
        peers=peers,
        tls=tls,
        plaintext=tls is None,
        config=config,
        rng=random.Random(node_id),
    )
    node = Node(transport, inbox, reports)
    await nursery.start(transport.run)
    return node


def heartbeat(frm: int, to: int, term: int = 1, commit: int = 0) -> Message:
    return Message(MT.HEARTBEAT, to=to, frm=frm, term=term, commit=commit)


def appends(frm: int, to: int, count: int, payload: int = 100) -> list[Message]:
    return [
        Message(
            MT.APP,
            to=to,
            frm=frm,
            term=2,
            log_term=2,
            index=i,
            commit=i,
            entries=(Entry(2, i + 1, bytes([i % 256]) * payload),),
        )
        for i in range(count)
    ]


async def raw_connect(port: int, files: NodeTLSFiles | None, server_id: int = 2) -> trio.abc.Stream:
    """A hand-driven client, to say things a Transport never would."""
    tcp = await trio.open_tcp_stream(LOCALHOST, port)
    if files is None:
        return tcp
    stream = trio.SSLStream(tcp, client_context(files), server_hostname=node_name(server_id))
    await stream.do_handshake()
    return stream


async def say_hello(
    stream: trio.abc.Stream,
    node_id: int,
    kind: StreamKind = StreamKind.MESSAGES,
    server_id: int = 2,
) -> None:
    """Open the conversation as ``node_id`` and check that the server accepts it."""
    await stream.send_all(codec.encode_hello(node_id, kind))
    reader = codec.FrameReader()
    with trio.fail_after(TIMEOUT):
        frames: list[tuple[codec.FrameType, bytes]] = []
        while not frames:
            data = await stream.receive_some(65536)
            assert data, "the server hung up instead of answering HELLO"
            frames = reader.feed(data)
    assert frames[0][0] is codec.FrameType.HELLO
    assert codec.decode_hello(frames[0][1]) == (server_id, kind)


async def assert_closed_by_peer(stream: trio.abc.Stream) -> None:
    """The other side closes ``stream`` (EOF or reset) within the timeout; anything it sent
    first (its HELLO) is skipped."""
    with trio.fail_after(TIMEOUT):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass


# ------------------------------------------------------------------------------------------
# Delivery


async def test_two_nodes_exchange_batches_over_mtls(pki: PKI) -> None:
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, 2, pki.tls(2))
        a = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, b.port)})
        b.transport.add_peer(1, (LOCALHOST, a.port))

        batch = appends(1, 2, 10)
        a.transport.send_batch(batch)
        await b.inbox.wait_for(lambda: len(b.inbox.msgs) == 10)
        assert b.inbox.msgs == batch
        # One Ready batch for one peer: one write, one frame, one delivery.
        assert a.transport.stats.writes == 1
        assert [len(x) for x in b.inbox.batches] == [10]
        assert a.transport.peer_state(2) is PeerState.UP

        reply = [Message(MT.APP_RESP, to=1, frm=2, term=2, index=10)]
        b.transport.send_batch(reply)
        await a.inbox.wait_for(lambda: a.inbox.msgs == reply)
        assert a.unreachable == [] and b.unreachable == []
        assert b.transport.stats.inbound_rejected == 0
        nursery.cancel_scope.cancel()


async def test_three_nodes_all_to_all(pki: PKI) -> None:
    async with trio.open_nursery() as nursery:
        nodes = {i: await start_node(nursery, i, pki.tls(i)) for i in (1, 2, 3)}
        for i, node in nodes.items():
            for j, other in nodes.items():
                if i != j:
                    node.transport.add_peer(j, (LOCALHOST, other.port))
        for round_ in range(3):
            for i, node in nodes.items():
                node.transport.send_batch([heartbeat(i, j, commit=round_) for j in nodes if j != i])
        for i, node in nodes.items():
            await node.inbox.wait_for(lambda node=node: len(node.inbox.msgs) == 6)
            got = sorted((m.frm, m.commit) for m in node.inbox.msgs)
            assert got == sorted((j, r) for j in nodes if j != i for r in range(3))
        nursery.cancel_scope.cancel()


async def test_plaintext_mode_for_loopback_simulation() -> None:
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, 2, None)
        a = await start_node(nursery, 1, None, {2: (LOCALHOST, b.port)})
        a.transport.send_batch(appends(1, 2, 3))
        await b.inbox.wait_for(lambda: len(b.inbox.msgs) == 3)
        nursery.cancel_scope.cancel()


async def test_delivery_to_a_memory_channel_or_a_sync_callback(pki: PKI) -> None:
    # The two ways a runtime can take messages: a bounded channel (async, pushes back) or a
    # plain function that posts them to its own inbox.
    inbox_send, inbox_receive = trio.open_memory_channel[list[Message]](4)
    seen: list[Message] = []
    got_reply = trio.Event()

    def on_reply(msgs: list[Message]) -> None:
        seen.extend(msgs)
        got_reply.set()

    b = Transport(2, on_messages=inbox_send.send, tls=pki.tls(2))
    a = Transport(1, on_messages=on_reply, tls=pki.tls(1))
    async with trio.open_nursery() as nursery, inbox_send, inbox_receive:
        port_b = await nursery.start(b.run)
        port_a = await nursery.start(a.run)
        a.set_peer_address(2, f"{LOCALHOST}:{port_b}")
        b.set_peer_address(1, f"{LOCALHOST}:{port_a}")
        a.send(appends(1, 2, 3))
        with trio.fail_after(TIMEOUT):
            batch = await inbox_receive.receive()
        assert batch == appends(1, 2, 3)
        b.send([Message(MT.APP_RESP, to=1, frm=2, term=2, index=3)])
        with trio.fail_after(TIMEOUT):
            await got_reply.wait()
        assert [m.index for m in seen] == [3]
        a.set_peer_address(2, "")  # address unknown again: peer removed
        assert a.peer_state(2) is None
        nursery.cancel_scope.cancel()


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:7001") == ("127.0.0.1", 7001)
    assert parse_address("[::1]:7001") == ("::1", 7001)
    assert parse_address("node-a.example:80") == ("node-a.example", 80)
    for bad in ("127.0.0.1", ":80", "host:", "host:x", "host:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)


async def test_transport_requires_tls_unless_plaintext_is_explicit() -> None:
    with pytest.raises(ValueError, match="plaintext"):
        Transport(1, on_messages=Inbox())


async def test_send_batch_refuses_messages_that_are_not_for_the_wire(pki: PKI) -> None:
    t = Transport(1, on_messages=Inbox(), tls=pki.tls(1), peers={2: (LOCALHOST, 1)})
    for bad in (
        Message(MT.HUP, to=2, frm=1),
        Message(MT.HEARTBEAT, to=1, frm=1),
        Message(MT.HEARTBEAT, to=2, frm=3),
        Message(MT.SNAP, to=2, frm=1),
    ):
        with pytest.raises(ValueError):
            t.send_batch([bad])


# ------------------------------------------------------------------------------------------
# Authentication


async def test_client_with_certificate_from_another_ca_is_refused(
    pki: PKI, impostor_pki: PKI, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, 2, pki.tls(2))

        # A raw client that trusts the real CA (so its own side of the handshake succeeds) but
        # presents a certificate from the impostor CA: the server must hang up on it.
        impostor = impostor_pki.node_files(3)
        files = NodeTLSFiles(pki.node_files(2).ca_cert, impostor.cert, impostor.key)
        stream = await raw_connect(b.port, files)
        try:
            await stream.send_all(codec.encode_hello(3, StreamKind.MESSAGES))
            await assert_closed_by_peer(stream)
        finally:
            await trio.aclose_forcefully(stream)

        # No client certificate at all: refused too.
        ctx = ssl.create_default_context(cafile=str(pki.node_files(2).ca_cert))
        tcp = await trio.open_tcp_stream(LOCALHOST, b.port)
        bare = trio.SSLStream(tcp, ctx, server_hostname=node_name(2))
        try:
            await bare.do_handshake()
            await bare.send_all(codec.encode_hello(3, StreamKind.MESSAGES))
            await assert_closed_by_peer(bare)
        finally:
            await trio.aclose_forcefully(bare)

        # A whole impostor transport: it cannot connect (it does not trust B's certificate,
        # and B would not trust its own), so it reports B unreachable and B hears nothing.
        c = await start_node(nursery, 3, impostor_pki.tls(3), {2: (LOCALHOST, b.port)})
        c.transport.send_batch([heartbeat(3, 2)])
        await c.reports.wait_for(lambda: 2 in c.unreachable)
        assert c.transport.peer_state(2) is not PeerState.UP
        assert b.inbox.msgs == []
        assert b.transport.stats.inbound_rejected >= 2
        nursery.cancel_scope.cancel()


async def test_dialer_refuses_a_server_that_is_not_the_peer_it_meant(pki: PKI) -> None:
    # A stale address book: node 1 believes node 2 lives where node 3 listens. The hostname
    # check (server_hostname=node-2) fails, nothing is delivered to node 3.
    async with trio.open_nursery() as nursery:
        c = await start_node(nursery, 3, pki.tls(3))
        a = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, c.port)})
        a.transport.send_batch([heartbeat(1, 2)])
        await a.reports.wait_for(lambda: 2 in a.unreachable)
        assert c.inbox.msgs == []
        assert a.transport.peer_state(2) is not PeerState.UP
        nursery.cancel_scope.cancel()


async def test_sender_id_spoofing_is_rejected(pki: PKI) -> None:
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, 2, pki.tls(2))
        files3 = pki.node_files(3)

        # HELLO claims node 1 with node 3's certificate.
        stream = await raw_connect(b.port, files3)
        try:
            await stream.send_all(codec.encode_hello(1, StreamKind.MESSAGES))
            await assert_closed_by_peer(stream)
        finally:
            await trio.aclose_forcefully(stream)

        # Honest HELLO, then a message that claims to come from node 1.
        stream = await raw_connect(b.port, files3)
        try:
            await say_hello(stream, 3)
            spoofed = codec.encode_message_frames([heartbeat(1, 2)])[0]
            await stream.send_all(spoofed)
            await assert_closed_by_peer(stream)
        finally:
            await trio.aclose_forcefully(stream)

        # A message for another node is refused the same way.
        stream = await raw_connect(b.port, files3)
        try:
            await say_hello(stream, 3)
            await stream.send_all(codec.encode_message_frames([heartbeat(3, 5)])[0])
            await assert_closed_by_peer(stream)
        finally:
            await trio.aclose_forcefully(stream)
        assert b.inbox.msgs == []
        assert b.transport.stats.inbound_rejected == 3

        # Control: the same client telling the truth is heard.
        stream = await raw_connect(b.port, files3)
        try:
            await say_hello(stream, 3)
            await stream.send_all(codec.encode_message_frames([heartbeat(3, 2)])[0])
            await b.inbox.wait_for(lambda: b.inbox.msgs == [heartbeat(3, 2)])
        finally:
            await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------
# Bad input closes one connection and nothing else


async def test_garbage_closes_only_that_connection(pki: PKI) -> None:
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, 2, pki.tls(2))
        a = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, b.port)})
        a.transport.send_batch([heartbeat(1, 2, commit=1)])
        await b.inbox.wait_for(lambda: len(b.inbox.msgs) == 1)

        # Plain TCP garbage at the TLS port.
        tcp = await raw_connect(b.port, None)
        try:
            await tcp.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await assert_closed_by_peer(tcp)
        finally:
            await trio.aclose_forcefully(tcp)

        # Garbage from an authenticated peer, before and after HELLO.
        for hello_first in (False, True):
            stream = await raw_connect(b.port, pki.node_files(3))
            try:
                if hello_first:
                    await say_hello(stream, 3)
                await stream.send_all(random.Random(7).randbytes(300))
                await assert_closed_by_peer(stream)
            finally:
                await trio.aclose_forcefully(stream)

        # A well-formed frame holding invalid msgpack.
        stream = await raw_connect(b.port, pki.node_files(3))
        try:
            await say_hello(stream, 3)
            await stream.send_all(codec.encode_frame(codec.FrameType.MESSAGES, b"\xc1\xc1"))
            await assert_closed_by_peer(stream)
        finally:
            await trio.aclose_forcefully(stream)

        # The established stream from node 1 was never disturbed.
        a.transport.send_batch([heartbeat(1, 2, commit=2)])
        await b.inbox.wait_for(lambda: len(b.inbox.msgs) == 2)
        assert [m.commit for m in b.inbox.msgs] == [1, 2]
        assert a.transport.stats.connects == 1 and a.transport.stats.disconnects == 0
        assert b.transport.stats.inbound_rejected == 4
        nursery.cancel_scope.cancel()


async def test_oversized_frame_is_refused_from_its_header(pki: PKI) -> None:
    config = TransportConfig(max_frame_size=64 * 1024, snapshot_chunk_size=32 * 1024)
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, 2, pki.tls(2), config=config)
        stream = await raw_connect(b.port, pki.node_files(3))
        try:
            await say_hello(stream, 3)
            # Only the header of a frame one byte over the limit; the body never comes, so the
            # server must decide from the header alone.
            await stream.send_all(codec.frame_header(codec.FrameType.MESSAGES, 64 * 1024 + 1))
            await assert_closed_by_peer(stream)
        finally:
            await trio.aclose_forcefully(stream)
        assert b.transport.stats.inbound_rejected == 1

        # A frame at the limit is fine.
        a = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, b.port)}, config=config)
        big = appends(1, 2, 1, payload=60 * 1024)
        a.transport.send_batch(big)
        await b.inbox.wait_for(lambda: b.inbox.msgs == big)
        nursery.cancel_scope.cancel()


async def test_new_message_stream_from_a_peer_replaces_the_old_one(pki: PKI) -> None:
    # A restarted peer dials again while its old connection may linger half-open: the newer
    # stream wins and the older one is closed at once.
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, 2, pki.tls(2))
        old = await raw_connect(b.port, pki.node_files(3))
        new = await raw_connect(b.port, pki.node_files(3))
        try:
            await say_hello(old, 3)
            await say_hello(new, 3)
            await assert_closed_by_peer(old)
            await new.send_all(codec.encode_message_frames([heartbeat(3, 2)])[0])
            await b.inbox.wait_for(lambda: b.inbox.msgs == [heartbeat(3, 2)])
        finally:
            await trio.aclose_forcefully(old)
            await trio.aclose_forcefully(new)
        nursery.cancel_scope.cancel()


async def test_inbound_connection_limit(pki: PKI) -> None:
    config = TransportConfig(max_inbound_connections=2)
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, 2, pki.tls(2), config=config)
        held = [await raw_connect(b.port, pki.node_files(3)) for _ in range(2)]
        extra = await trio.open_tcp_stream(LOCALHOST, b.port)
        try:
            await assert_closed_by_peer(extra)
            assert b.transport.stats.inbound_rejected == 1
            await say_hello(held[0], 3)  # the connections within the limit still work
        finally:
            for stream in [*held, extra]:
                await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()


async def test_handshake_timeout_closes_silent_connections(pki: PKI) -> None:
    config = TransportConfig(handshake_timeout=0.2)
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, 2, pki.tls(2), config=config)
        tcp = await raw_connect(b.port, None)
        try:
            await assert_closed_by_peer(tcp)  # never says anything: closed after 0.2 s
        finally:
            await trio.aclose_forcefully(tcp)
        assert b.transport.stats.inbound_rejected == 1
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------
# Flow control, failure reports, reconnects


async def silent_listener(nursery: trio.Nursery) -> int:
    """A port that accepts TCP connections and never says a word: a dial to it hangs in the
    TLS handshake."""
    listeners = await trio.open_tcp_listeners(0, host=LOCALHOST)
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        async with stream:
            await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, hold, listeners)
    return listeners[0].socket.getsockname()[1]


async def test_full_queue_drops_and_reports_unreachable(pki: PKI) -> None:
    config = TransportConfig(queue_max_messages=8, connect_timeout=30)
    async with trio.open_nursery() as nursery:
        port = await silent_listener(nursery)
        a = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, port)}, config=config)
        a.transport.send_batch(appends(1, 2, 5))
        a.transport.send_batch(appends(1, 2, 3))  # exactly full: still accepted
        assert a.unreachable == []
        assert a.transport.peer_state(2) is PeerState.CONNECTING
        a.transport.send_batch([heartbeat(1, 2)])  # one too many: dropped, reported
        assert a.unreachable == [2]
        assert a.transport.stats.messages_dropped == 1
        # Messages to a peer nobody told us about are reported the same way.
        a.transport.send_batch([heartbeat(1, 9)])
        assert a.unreachable == [2, 9]
        nursery.cancel_scope.cancel()


async def test_byte_bound_of_the_queue(pki: PKI) -> None:
    config = TransportConfig(queue_max_bytes=10_000, connect_timeout=30)
    async with trio.open_nursery() as nursery:
        port = await silent_listener(nursery)
        a = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, port)}, config=config)
        a.transport.send_batch(appends(1, 2, 1, payload=6_000))
        assert a.unreachable == []
        a.transport.send_batch(appends(1, 2, 1, payload=6_000))
        assert a.unreachable == [2]
        nursery.cancel_scope.cancel()


async def test_down_peer_is_reported_and_messages_not_queued(pki: PKI) -> None:
    # A port with nothing listening: connection refused at once, the peer goes DOWN.
    listeners = await trio.open_tcp_listeners(0, host=LOCALHOST)
    dead_port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    config = TransportConfig(backoff_initial=5, backoff_max=5)  # stays DOWN for the test
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, dead_port)}, config=config)
        a.transport.send_batch([heartbeat(1, 2)])
        await a.reports.wait_for(lambda: a.unreachable == [2])
        assert a.transport.peer_state(2) is PeerState.DOWN
        a.transport.send_batch([heartbeat(1, 2), heartbeat(1, 2)])
        assert a.unreachable == [2, 2]  # one report per dropped batch, not per message
        nursery.cancel_scope.cancel()


async def test_slow_receiver_pushes_back_until_the_sender_reports_it(pki: PKI) -> None:
    # Node 2's inbox is "full" (deliveries block), so it stops reading; TCP buffers fill, node
    # 1's writes stall, its queue fills, and it reports node 2 unreachable, without any
    # disconnect. When node 2 catches up, everything that was not dropped arrives.
    config = TransportConfig(queue_max_bytes=64 * 1024)
    gate = trio.Event()
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, 2, pki.tls(2), inbox=Inbox(gate), config=config)
        a = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, b.port)}, config=config)
        # The first delivery gets through and then blocks: from here on node 2 reads nothing.
        a.transport.send_batch([heartbeat(1, 2)])
        await b.inbox.wait_for(lambda: len(b.inbox.msgs) == 1)
        sent: list[Message] = [heartbeat(1, 2)]
        with trio.fail_after(TIMEOUT):
            while not a.unreachable:
                batch = appends(1, 2, 4, payload=4096)
                a.transport.send_batch(batch)
                if not a.unreachable:
                    sent += batch
                # Let the sender write until it blocks on the full socket (or has nothing left).
                await trio.testing.wait_all_tasks_blocked()
        assert a.unreachable == [2]
        assert a.transport.peer_state(2) is PeerState.UP
        # More was accepted than the queue alone holds: the writer drained into the socket
        # until TCP pushed back.
        assert len(sent) * 4096 > config.queue_max_bytes
        gate.set()
        await b.inbox.wait_for(lambda: len(b.inbox.msgs) == len(sent))
        assert b.inbox.msgs == sent
        assert a.transport.stats.disconnects == 0
        nursery.cancel_scope.cancel()


async def test_reconnect_after_the_peer_restarts(pki: PKI) -> None:
    async with trio.open_nursery() as nursery:
        b1 = await start_node(nursery, 2, pki.tls(2))
        port = b1.port
        a = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, port)})
        a.transport.send_batch([heartbeat(1, 2, commit=1)])
        await b1.inbox.wait_for(lambda: len(b1.inbox.msgs) == 1)

        b1.transport.close()
        # The idle stream notices the peer's end without anything to send.
        await a.reports.wait_for(lambda: 2 in a.unreachable)

        b2 = await start_node(nursery, 2, pki.tls(2), port=port)
        # Raft keeps sending heartbeats; model that until one gets through the new stream.
        with trio.fail_after(TIMEOUT):
            commit = 2
            while not b2.inbox.msgs:
                a.transport.send_batch([heartbeat(1, 2, commit=commit)])
                commit += 1
                with trio.move_on_after(0.05):
                    await b2.inbox.changed()
        assert a.transport.peer_state(2) is PeerState.UP
        assert a.transport.stats.connects == 2
        # Once up, nothing is lost: a batch arrives whole.
        before = len(b2.inbox.msgs)
        a.transport.send_batch(appends(1, 2, 20))
        await b2.inbox.wait_for(lambda: len(b2.inbox.msgs) == before + 20)
        nursery.cancel_scope.cancel()


async def test_remove_and_readd_peer(pki: PKI) -> None:
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, 2, pki.tls(2))
        a = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, b.port)})
        a.transport.send_batch([heartbeat(1, 2)])
        await b.inbox.wait_for(lambda: len(b.inbox.msgs) == 1)
        a.transport.remove_peer(2)
        assert a.unreachable == [2]  # the stream was up: in-flight data may be lost
        assert a.transport.peer_state(2) is None
        a.transport.send_batch([heartbeat(1, 2)])
        assert a.unreachable == [2, 2]
        a.transport.add_peer(2, (LOCALHOST, b.port))
        a.transport.send_batch([heartbeat(1, 2, commit=5)])
        await b.inbox.wait_for(lambda: len(b.inbox.msgs) == 2)
        assert b.inbox.msgs[-1].commit == 5
        nursery.cancel_scope.cancel()


async def test_close_shuts_down_cleanly(pki: PKI) -> None:
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, 2, pki.tls(2))
        a = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, b.port)})
        b.transport.add_peer(1, (LOCALHOST, a.port))
        a.transport.send_batch([heartbeat(1, 2)])
        b.transport.send_batch([heartbeat(2, 1)])
        await b.inbox.wait_for(lambda: len(b.inbox.msgs) == 1)
        await a.inbox.wait_for(lambda: len(a.inbox.msgs) == 1)
        a.transport.close()
        b.transport.close()
        a.transport.send_batch([heartbeat(1, 2)])  # ignored after close, no report
        assert a.unreachable == []
    # Leaving the nursery means both run() calls returned: no task outlived its transport.


# ------------------------------------------------------------------------------------------
# APP requests: the embedding application's request/response beside Raft


async def test_app_requests_ride_the_same_port_and_identity(pki: PKI, impostor_pki: PKI) -> None:
    seen: list[tuple[int, bytes]] = []

    async def echo(peer_id: int, body: bytes) -> bytes:
        seen.append((peer_id, body))
        if body == b"boom":
            raise RuntimeError("handler bug")
        return b"re:" + body

    async with trio.open_nursery() as nursery:
        server = Transport(
            2, on_messages=Inbox(), on_request=echo, host=LOCALHOST, tls=pki.tls(2), config=FAST
        )
        await nursery.start(server.run)
        silent = await start_node(nursery, 3, pki.tls(3))  # serves no APP requests
        client = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, server.port)})
        reply = await client.transport.request(2, b"ping", timeout=TIMEOUT)
        assert reply == b"re:ping"
        # The handler learns who asked from the certificate; an explicit address works too.
        again = await client.transport.request(
            2, b"x", address=(LOCALHOST, server.port), timeout=TIMEOUT
        )
        assert again == b"re:x" and seen == [(1, b"ping"), (1, b"x")]
        # A failing handler ends that request only; the server keeps answering.
        with pytest.raises(TransportError):
            await client.transport.request(2, b"boom", timeout=TIMEOUT)
        assert await client.transport.request(2, b"ok", timeout=TIMEOUT) == b"re:ok"
        # A node without a handler refuses; an unknown peer has no address.
        with pytest.raises(TransportError):
            await client.transport.request(
                3, b"ping", address=(LOCALHOST, silent.port), timeout=TIMEOUT
            )
        with pytest.raises(TransportError):
            await client.transport.request(9, b"ping", timeout=TIMEOUT)
        # The address must belong to the node named: node 3's port does not answer as node 2.
        with pytest.raises(TransportError):
            await client.transport.request(
                2, b"ping", address=(LOCALHOST, silent.port), timeout=TIMEOUT
            )
        # A client from another CA never reaches the handler.
        impostor = await start_node(nursery, 1, impostor_pki.tls(1))
        with pytest.raises(TransportError):
            await impostor.transport.request(
                2, b"evil", address=(LOCALHOST, server.port), timeout=TIMEOUT
            )
        assert b"evil" not in [b for _, b in seen]
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------
# Snapshots


async def test_snapshot_goes_in_chunks_while_heartbeats_keep_flowing(pki: PKI) -> None:
    # The snapshot (24 MiB) is far larger than a frame (1 MiB): it can only arrive chunked.
    config = TransportConfig(max_frame_size=1024 * 1024, snapshot_chunk_size=128 * 1024)
    data = random.Random(1).randbytes(24 * 1024 * 1024)
    snap = Snapshot(SnapshotMetadata(1000, 3, ConfState(frozenset({1, 2, 3}))), data)
    msg = Message(MT.SNAP, to=2, frm=1, term=3, snapshot=snap)
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, 2, pki.tls(2), config=config)
        a = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, b.port)}, config=config)
        # Warm up the message stream so that its connect time is not counted below.
        a.transport.send_batch([heartbeat(1, 2, commit=0)])
        await b.inbox.wait_for(lambda: len(b.inbox.msgs) == 1)

        def snapshot_arrived() -> bool:
            return any(m.type is MT.SNAP for m in b.inbox.msgs)

        a.transport.send_batch([msg])
        heartbeats_during = 0
        commit = 1
        with trio.fail_after(30):
            while not snapshot_arrived():
                a.transport.send_batch([heartbeat(1, 2, commit=commit)])
                await b.inbox.wait_for(
                    lambda c=commit: snapshot_arrived() or b.inbox.msgs[-1].commit == c
                )
                if not snapshot_arrived():
                    heartbeats_during += 1
                commit += 1
            await a.reports.wait_for(lambda: a.snapshot_status == [(2, True)])
        received = next(m for m in b.inbox.msgs if m.type is MT.SNAP)
        assert received == msg
        assert heartbeats_during >= 3, heartbeats_during
        assert b.transport.stats.snapshots_received == 1
        assert a.transport.stats.snapshots_sent == 1
        nursery.cancel_scope.cancel()


async def test_snapshot_to_unreachable_peer_reports_failure(pki: PKI) -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOCALHOST)
    dead_port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    snap = Snapshot(SnapshotMetadata(5, 1, ConfState(frozenset({1, 2}))), b"x" * 1000)
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, dead_port)})
        a.transport.send_batch([Message(MT.SNAP, to=2, frm=1, term=1, snapshot=snap)])
        await a.reports.wait_for(lambda: a.snapshot_status == [(2, False)])
        a.transport.send_batch([Message(MT.SNAP, to=7, frm=1, term=1, snapshot=snap)])
        assert a.snapshot_status == [(2, False), (7, False)]  # unknown peer: at once
        nursery.cancel_scope.cancel()


async def test_lost_snapshots_are_always_reported(pki: PKI) -> None:
    # The leader waits for report_snapshot before it replicates to that follower again, so
    # every MsgSnap handed over must be answered, including ones superseded or abandoned.
    snap = Snapshot(SnapshotMetadata(5, 1, ConfState(frozenset({1, 2}))), b"x" * 1000)
    config = TransportConfig(connect_timeout=30)
    async with trio.open_nursery() as nursery:
        port = await silent_listener(nursery)  # the dial hangs: the snapshot stays in flight
        a = await start_node(nursery, 1, pki.tls(1), {2: (LOCALHOST, port)}, config=config)
        first, second, third = (
            Message(MT.SNAP, to=2, frm=1, term=t, snapshot=snap) for t in (1, 2, 3)
        )
        a.transport.send_batch([first])
        await trio.testing.wait_all_tasks_blocked()  # the snapshot sender took it: in flight
        a.transport.send_batch([second])  # waits behind it
        a.transport.send_batch([third])  # supersedes the waiting one
        assert a.snapshot_status == [(2, False)]
        a.transport.remove_peer(2)  # in flight + waiting: both reported
        assert a.snapshot_status == [(2, False)] * 3
        nursery.cancel_scope.cancel()


async def test_snapshot_from_spoofed_sender_is_refused(pki: PKI) -> None:
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, 2, pki.tls(2))
        snap = Snapshot(SnapshotMetadata(5, 1, ConfState(frozenset({1, 2}))), b"x" * 1000)
        stream = await raw_connect(b.port, pki.node_files(3))
        try:
            await say_hello(stream, 3, StreamKind.SNAPSHOT)
            # Refused at SNAP_BEGIN, before any chunk is buffered.
            await stream.send_all(
                codec.encode_snap_begin(Message(MT.SNAP, to=2, frm=1, term=1, snapshot=snap))
            )
            await assert_closed_by_peer(stream)
        finally:
            await trio.aclose_forcefully(stream)
        assert b.inbox.msgs == []
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------
# TLS helpers


def test_backoff_is_capped_exponential_with_jitter() -> None:
    backoff = Backoff(0.1, 1.0, random.Random(3))
    delays = [backoff.next_delay() for _ in range(8)]
    nominal = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    for delay, cap in zip(delays, nominal, strict=True):
        assert cap / 2 <= delay <= cap
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    backoff.reset()
    assert 0.05 <= backoff.next_delay() <= 0.1
    for _ in range(10_000):  # no overflow on a very long outage
        assert backoff.next_delay() <= 1.0


def test_node_names_roundtrip_and_refuse_other_names() -> None:
    assert node_name(42) == "node-42"
    assert node_id_from_name("node-42") == 42
    for bad in ("node-0", "node-042", "node-", "node-1x", "Node-1", "host-1", "node--1"):
        with pytest.raises(PeerIdentityError):
            node_id_from_name(bad)
    with pytest.raises(ValueError):
        node_name(0)


def test_node_certificate_carries_the_identity(pki: PKI) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    cert = pki.ca.issue_node_certificate(5).cert
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-5"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "node-5" in sans.get_values_for_type(x509.DNSName)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.issuer == pki.ca.certified.cert.subject
    # The key file is private.
    assert pki.node_files(1).key.stat().st_mode & 0o077 == 0


def test_benchmarks_run() -> None:
    # The figures themselves are reported by `python -m consensus.transport.bench`; this keeps
    # the tool working. Sync test: the benchmark runs its own trio loop.
    codec_rates = bench_codec(seconds=0.05)
    assert codec_rates["encode_decode_msgs_per_s"] > 0
    result = bench_loopback(total=2_000, batch=16, window=64)
    assert result["messages"] == 1_999
    assert result["drops_reported"] == 0
