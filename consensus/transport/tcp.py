"""The trio transport of one Raft node: a listener, and one sender per peer.

Task tree (everything under the nursery of ``run``, which the caller starts)::

    Transport.run
    ├── serve_listeners ── one task per accepted connection
    │     accept (TLS handshake, HELLO) → receive MESSAGES frames → on_messages(batch)
    │                                   or receive snapshots    → on_messages([snap]) → SNAP_ACK
    │                                   or one APP request      → on_request(peer, body) → reply
│                                   or an APP stream        → on_stream(peer, AppStream)
    └── per peer (own cancel scope; removed with remove_peer)
          ├── sender:          dial ─► write whatever the PeerQueue holds, one write per drain
          │                        └► watch the stream for EOF (the peer never talks back)
          └── snapshot sender: one fresh connection per MsgSnap, chunked; on_snapshot_status

``request`` (called by the embedding application, not by Raft) dials a fresh ``APP`` connection,
writes one frame and reads one reply: the application's own request/response protocol rides on
the same port, certificates and identity checks as Raft, and never queues behind Raft traffic.
``open_stream`` dials the same kind of connection and hands it over as an ``AppStream``, for an
application that sends or answers in many frames (chunked transfers, followed logs); an acceptor
given ``on_stream`` gets every ``APP`` connection that way (and answers ``request`` by reading
one body and sending one back).

Outbound flow control is etcd's: ``send_batch`` never blocks. Each peer has a bounded queue;
when it is full, or the peer is known to be down (we are waiting out a reconnect backoff), the
batch is dropped and ``on_unreachable(peer)`` called so the leader stops pipelining to it and
probes instead. Raft retransmits, so a dropped message costs latency, never safety. Inbound flow
control is TCP's: ``on_messages`` may block (the node's inbox is full), the receiver stops
reading, the peer's writes stall, its queue fills, and it reports us unreachable.
"""

from __future__ import annotations

import enum
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from consensus.core.types import LOCAL_MESSAGES, NONE, Message, MessageType

from . import codec
from .app_stream import AppStream
from .backoff import Backoff
from .codec import FrameType, StreamKind
from .config import TransportConfig
from .connection import CONNECTION_ERRORS, FramedStream, accept, dial
from .errors import FrameError, PeerIdentityError, TransportError
from .peer_queue import PeerQueue
from .snapshot_stream import receive_snapshots, send_snapshot
from .tls import TLSConfig

log = logging.getLogger(__name__)

Address = tuple[str, int]


class PeerState(enum.Enum):
    """Outbound state of one peer's message stream."""

    CONNECTING = "connecting"
    """Dialing (or not dialed yet): messages queue up, within the queue's bounds."""
    UP = "up"
    """Connected and authenticated both ways: messages are written as they come."""
    DOWN = "down"
    """The last attempt failed; waiting out the backoff. Messages are dropped and reported."""


@dataclass(slots=True)
class TransportStats:
    """Counters for status pages and tests. Plain ints: the transport runs on one thread."""

    messages_sent: int = 0
    messages_received: int = 0
    messages_dropped: int = 0
    writes: int = 0
    bytes_sent: int = 0
    connects: int = 0
    disconnects: int = 0
    inbound_accepted: int = 0
    inbound_rejected: int = 0
    """Connections refused: failed handshake, bad certificate, spoofed sender, garbage,
    oversized frame, or over ``max_inbound_connections``."""
    snapshots_sent: int = 0
    snapshots_failed: int = 0
    snapshots_received: int = 0
    requests_received: int = 0
    """``APP`` requests handed to ``on_request``."""


def _ignore_unreachable(peer_id: int) -> None:
    pass


def _ignore_snapshot_status(peer_id: int, ok: bool) -> None:
    pass


class _Peer:
    __slots__ = (
        "address",
        "id",
        "queue",
        "scope",
        "snapshot",
        "snapshot_in_flight",
        "snapshot_ready",
        "state",
    )

    def __init__(self, peer_id: int, address: Address, config: TransportConfig) -> None:
        self.id = peer_id
        self.address = address
        self.queue = PeerQueue(config.queue_max_messages, config.queue_max_bytes)
        self.state = PeerState.CONNECTING
        self.scope = trio.CancelScope()
        # At most one snapshot waits per peer: the core sends the next only after
        # report_snapshot, and a newer one supersedes an older one anyway.
        self.snapshot: Message | None = None
        self.snapshot_ready = trio.Event()
        self.snapshot_in_flight = False


class Transport:
    """Sends and receives Raft messages for node ``node_id`` over TCP, mutual TLS by default.

    Parameters:
        node_id: this node's Raft id; with TLS it must match our certificate (``node-<id>``).
        on_messages: ``on_messages(batch)`` for every batch received from a peer (all from the
            same authenticated sender, all addressed to us; a MsgSnap arrives alone with its
            complete data). If it returns an awaitable, that is awaited before the connection
            is read further: an async callback that blocks (e.g. the ``send`` of a bounded
            ``trio.open_memory_channel[list[Message]]``) pushes back on the peer through TCP.
        on_unreachable: ``on_unreachable(peer_id)`` when messages to a peer were dropped or a
            connection to it broke (map to ``RawNode.report_unreachable``).
        on_snapshot_status: ``on_snapshot_status(peer_id, ok)`` once per MsgSnap handed to
            ``send_batch`` (map to ``RawNode.report_snapshot``).
        on_request: ``await on_request(peer_id, body) -> reply`` for each ``APP`` request an
            authenticated peer sends (see ``request``); without it such connections are refused.
            An exception it raises closes that one connection.
        on_stream: ``await on_stream(peer_id, stream)`` for each ``APP`` connection an
            authenticated peer opens, instead of ``on_request``: the ``AppStream`` is the whole
            connection (read the first body within a timeout of your own), closed when it
            returns. An exception it raises closes that one connection.
        host, port: where to listen; port 0 picks a free port (``run`` reports it).
        peers: ``{peer_id: (host, port)}``; change later with ``add_peer``/``remove_peer``.
        tls: the mutual-TLS contexts. Required unless ``plaintext=True``.
        plaintext: run without TLS, trusting the HELLO frame for identity: loopback
            simulation and benchmarks only.
        config: tunables, see ``TransportConfig``.
        rng: randomness for backoff jitter (seed it in tests that care).

    The two sync callbacks are called from ``send_batch`` itself or from transport tasks; they
    must not block (hand the event to the node's task, e.g. with ``send_nowait``).
    """

    def __init__(
        self,
        node_id: int,
        *,
        on_messages: Callable[[list[Message]], Awaitable[None] | None],
        on_unreachable: Callable[[int], None] = _ignore_unreachable,
        on_snapshot_status: Callable[[int, bool], None] = _ignore_snapshot_status,
        on_request: Callable[[int, bytes], Awaitable[bytes]] | None = None,
        on_stream: Callable[[int, AppStream], Awaitable[None]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        peers: Mapping[int, Address] | None = None,
        tls: TLSConfig | None = None,
        plaintext: bool = False,
        config: TransportConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if node_id <= NONE:
            raise ValueError(f"node ids are positive, got {node_id}")
        if tls is None and not plaintext:
            raise ValueError("pass tls=TLSConfig(...), or plaintext=True for loopback testing")
        if tls is not None and plaintext:
            raise ValueError("tls and plaintext=True are exclusive")
        self.node_id = node_id
        self.config = config if config is not None else TransportConfig()
        self.stats = TransportStats()
        self._on_messages = on_messages
        self._on_unreachable = on_unreachable
        self._on_snapshot_status = on_snapshot_status
        self._on_request = on_request
        self._on_stream = on_stream
        self._host = host
        self._port = port
        self._server_context: ssl.SSLContext | None = tls.server if tls else None
        self._client_context: ssl.SSLContext | None = tls.client if tls else None
        self._rng = rng if rng is not None else random.Random()
        self._peers: dict[int, _Peer] = {}
        self._nursery: trio.Nursery | None = None
        self._started = False
        self._closed = False
        self._inbound = 0
        self._inbound_streams: dict[int, trio.CancelScope] = {}
        for peer_id, address in (peers or {}).items():
            self.add_peer(peer_id, address)

    # ----------------------------------------------------------------------------------------
    # Lifecycle

    @property
    def port(self) -> int:
        """The bound port (meaningful once ``run`` has started)."""
        return self._port

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, dial peers and serve until cancelled or ``close()``d.

        Use ``port = await nursery.start(transport.run)``: it returns once the listener is
        bound, with the port. Cancelling the enclosing scope (or ``close()``) shuts everything
        down: connections are closed without ceremony and queued messages are dropped."""
        if self._started or self._closed:
            raise RuntimeError("a Transport runs once; make a new one to restart")
        self._started = True
        listeners = await trio.open_tcp_listeners(self._port, host=self._host)
        try:
            # With several listeners (host=None: IPv4 and IPv6) port 0 may bind different ports;
            # the first one is the advertised one. Nodes are given an explicit host.
            self._port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(trio.serve_listeners, self._handle_inbound, listeners)
                for peer in self._peers.values():
                    nursery.start_soon(self._run_peer, peer)
                log.info(
                    "transport listening node=%d addr=%s:%d", self.node_id, self._host, self._port
                )
                task_status.started(self._port)
        finally:
            self._closed = True
            self._nursery = None
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    def close(self) -> None:
        """Stop ``run`` (it returns normally). Idempotent; messages sent afterwards are ignored."""
        self._closed = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # ----------------------------------------------------------------------------------------
    # Membership

    def add_peer(self, peer_id: int, address: Address) -> None:
        """Start talking to ``peer_id`` at ``address`` (or move it to a new address)."""
        if peer_id <= NONE or peer_id == self.node_id:
            raise ValueError(f"invalid peer id {peer_id}")
        old = self._peers.get(peer_id)
        if old is not None:
            if old.address == address:
                return
            self.remove_peer(peer_id)
        peer = _Peer(peer_id, address, self.config)
        self._peers[peer_id] = peer
        if self._nursery is not None:
            self._nursery.start_soon(self._run_peer, peer)

    def set_peer_address(self, peer_id: int, address: str) -> None:
        """``add_peer`` with a ``"host:port"`` string (``"[v6addr]:port"`` for IPv6), the form
        the node runtime keeps in its membership; an empty string (address not known yet)
        removes the peer."""
        if not address:
            self.remove_peer(peer_id)
            return
        self.add_peer(peer_id, parse_address(address))

    def remove_peer(self, peer_id: int) -> None:
        """Stop talking to ``peer_id`` and drop what is queued for it.

        Reports as for any loss (the peer may only be moving to a new address, and a leader
        that never heard "snapshot failed" would wait for it forever): ``on_unreachable`` if the
        stream was up or had messages waiting, ``on_snapshot_status(peer, False)`` for a
        snapshot waiting or in flight. For a peer that left the cluster the core ignores them.
        Inbound connections from it are not cut: the core ignores a removed node's messages."""
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        peer.scope.cancel()
        if self._closed:
            return
        lost = peer.queue.clear()
        self.stats.messages_dropped += len(lost)
        if lost or peer.state is PeerState.UP:
            self._on_unreachable(peer_id)
        for _ in range((peer.snapshot is not None) + peer.snapshot_in_flight):
            self.stats.snapshots_failed += 1
            self._on_snapshot_status(peer_id, False)

    def peer_state(self, peer_id: int) -> PeerState | None:
        """Outbound state of ``peer_id``'s message stream (None for an unknown peer)."""
        peer = self._peers.get(peer_id)
        return None if peer is None else peer.state

    # ----------------------------------------------------------------------------------------
    # Sending

    def send_batch(self, msgs: Iterable[Message]) -> None:
        """Queue the messages of one Ready batch; never blocks.

        Messages are grouped by destination; each peer's group is queued whole and leaves in a
        single write (with anything else queued for that peer by then). A group that does not
        fit, or whose peer is down or unknown, is dropped and ``on_unreachable(peer)`` called
        once. A MsgSnap goes to the peer's snapshot stream and is answered by
        ``on_snapshot_status``. Local message types, messages to ourselves and messages not
        ``frm`` us are programming errors (``ValueError``)."""
        if self._closed:
            return
        groups: dict[int, list[Message]] = {}
        me = self.node_id
        local = LOCAL_MESSAGES
        for m in msgs:
            if m.type in local or m.frm != me or m.to == me or m.to == NONE:
                raise ValueError(f"not a message to send: {m.type.name} {m.frm}->{m.to}")
            if m.type is MessageType.SNAP:
                if m.snapshot is None:
                    raise ValueError("a SNAP message without a snapshot")
                self._queue_snapshot(m)
                continue
            group = groups.get(m.to)
            if group is None:
                groups[m.to] = [m]
            else:
                group.append(m)
        for peer_id, group in groups.items():
            peer = self._peers.get(peer_id)
            if (
                peer is not None
                and peer.state is not PeerState.DOWN
                and peer.queue.put_nowait(group)
            ):
                continue
            self.stats.messages_dropped += len(group)
            if peer is None:
                log.debug("dropped messages to unknown peer node=%d peer=%d", me, peer_id)
            elif peer.state is not PeerState.DOWN:
                log.warning(
                    "dropped messages: sending buffer full node=%d peer=%d count=%d",
                    me,
                    peer_id,
                    len(group),
                )
            self._on_unreachable(peer_id)

    def send(self, msgs: Iterable[Message]) -> None:
        """Same as ``send_batch`` (the name the node runtime's ``Transport`` protocol uses)."""
        self.send_batch(msgs)

    async def request(
        self, peer_id: int, body: bytes, *, address: Address | None = None, timeout: float
    ) -> bytes:
        """Send ``body`` to ``peer_id``'s ``on_request`` over a connection of its own and return
        the reply, within ``timeout`` seconds for the whole exchange.

        ``address`` defaults to the peer's known address. Raises ``TransportError`` when the
        peer cannot be reached, is not who it should be, refuses, or does not answer in time."""
        address = self._address_of(peer_id, address)
        try:
            with trio.fail_after(timeout):
                conn = await self._dial(peer_id, address, StreamKind.APP)
                try:
                    await conn.send_all(codec.encode_frame(FrameType.APP, body))
                    frame = await conn.receive_frame()
                finally:
                    await conn.aclose()
        except CONNECTION_ERRORS as exc:
            raise TransportError(f"request to node {peer_id} failed: {_describe(exc)}") from exc
        if frame is None or frame[0] is not FrameType.APP:
            raise TransportError(f"node {peer_id} closed the request without a reply")
        return frame[1]

    def _address_of(self, peer_id: int, address: Address | None) -> Address:
        """``address``, or else where ``peer_id`` is known to be."""
        if address is not None:
            return address
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransportError(f"no address known for node {peer_id}")
        return peer.address

    @asynccontextmanager
    async def open_stream(
        self, peer_id: int, *, address: Address | None = None
    ) -> AsyncIterator[AppStream]:
        """``async with transport.open_stream(peer) as stream``: a fresh ``APP`` connection to
        ``peer_id`` (dialed within ``connect_timeout``), closed when the block ends. Bound the
        exchange with your own timeouts; ``TransportError`` when the peer cannot be reached or
        is not who it should be, and for any failure of the stream itself."""
        address = self._address_of(peer_id, address)
        try:
            conn = await self._dial(peer_id, address, StreamKind.APP)
        except CONNECTION_ERRORS as exc:
            raise TransportError(f"stream to node {peer_id} failed: {_describe(exc)}") from exc
        stream = AppStream(
            conn, max_body=self.config.max_frame_size, write_timeout=self.config.write_timeout
        )
        try:
            yield stream
        finally:
            await conn.aclose()

    def _queue_snapshot(self, m: Message) -> None:
        peer = self._peers.get(m.to)
        if peer is None:
            self.stats.snapshots_failed += 1
            self._on_snapshot_status(m.to, False)
            return
        if peer.snapshot is not None:
            self.stats.snapshots_failed += 1
            self._on_snapshot_status(peer.id, False)
        peer.snapshot = m
        peer.snapshot_ready.set()

    # ----------------------------------------------------------------------------------------
    # Per-peer outbound tasks

    async def _run_peer(self, peer: _Peer) -> None:
        with peer.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_messages, peer)
                nursery.start_soon(self._send_snapshots, peer)

    async def _dial(self, peer_id: int, address: Address, kind: StreamKind) -> FramedStream:
        with trio.fail_after(self.config.connect_timeout):
            return await dial(
                self.node_id,
                peer_id,
                address,
                kind,
                client_context=self._client_context,
                max_frame_size=self.config.max_frame_size,
                receive_size=self.config.receive_size,
            )

    async def _send_messages(self, peer: _Peer) -> None:
        cfg = self.config
        backoff = Backoff(cfg.backoff_initial, cfg.backoff_max, self._rng)
        while True:
            peer.state = PeerState.CONNECTING
            try:
                conn = await self._dial(peer.id, peer.address, StreamKind.MESSAGES)
            except CONNECTION_ERRORS as exc:
                # Report only if something was waiting: an idle peer being redialed is not news.
                self._mark_down(peer, f"dial failed: {_describe(exc)}", report=len(peer.queue) > 0)
                await trio.sleep(backoff.next_delay())
                continue
            peer.state = PeerState.UP
            up_since = trio.current_time()
            self.stats.connects += 1
            log.info("connected node=%d peer=%d addr=%s:%d", self.node_id, peer.id, *peer.address)
            try:
                reason = await self._pump(peer, conn)
            finally:
                await conn.aclose()
            # Whatever was written but not yet read by the peer is lost with the connection.
            self._mark_down(peer, reason, report=True)
            self.stats.disconnects += 1
            # Only a connection that stayed up a while earns a fast redial; one that flaps
            # (accepted, then dropped at once) keeps backing off.
            if trio.current_time() - up_since >= cfg.backoff_max:
                backoff.reset()
            await trio.sleep(backoff.next_delay())

    def _mark_down(self, peer: _Peer, reason: str, *, report: bool) -> None:
        was_up = peer.state is PeerState.UP
        peer.state = PeerState.DOWN
        dropped = peer.queue.clear()
        self.stats.messages_dropped += len(dropped)
        level = logging.WARNING if was_up else logging.DEBUG
        log.log(level, "peer unreachable node=%d peer=%d reason=%s", self.node_id, peer.id, reason)
        if report or dropped:
            self._on_unreachable(peer.id)

    async def _pump(self, peer: _Peer, conn: FramedStream) -> str:
        """Write queued messages to ``conn`` until it fails; returns why it ended."""
        reason = "connection closed"
        max_frame_size = self.config.max_frame_size
        write_timeout = self.config.write_timeout
        stats = self.stats

        async def write(cancel_scope: trio.CancelScope) -> None:
            nonlocal reason
            try:
                while True:
                    msgs = await peer.queue.get_all()
                    data, too_large = codec.encode_message_frames(msgs, max_frame_size)
                    if too_large:
                        log.error(
                            "dropped messages larger than max_frame_size node=%d peer=%d count=%d",
                            self.node_id,
                            peer.id,
                            len(too_large),
                        )
                        stats.messages_dropped += len(too_large)
                        self._on_unreachable(peer.id)
                    if data:
                        # The whole drain goes out back to back: one send_all per 256 KiB
                        # (one for any ordinary Ready batch), never one per message.
                        await conn.send_all(data, write_timeout)
                        stats.writes += 1
                        stats.bytes_sent += len(data)
                        stats.messages_sent += len(msgs) - len(too_large)
            except CONNECTION_ERRORS as exc:
                reason = f"write failed: {_describe(exc)}"
            cancel_scope.cancel()

        async def watch(cancel_scope: trio.CancelScope) -> None:
            # The acceptor never writes on a message stream after HELLO, so the only thing to
            # read is the end of it: this notices a dead peer even while we have nothing to send.
            nonlocal reason
            try:
                frame = await conn.receive_frame()
                if frame is None:
                    reason = "peer closed the connection"
                else:
                    reason = f"unexpected {frame[0].name} frame from the peer"
            except CONNECTION_ERRORS as exc:
                reason = f"read failed: {_describe(exc)}"
            cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write, nursery.cancel_scope)
            nursery.start_soon(watch, nursery.cancel_scope)
        return reason

    async def _send_snapshots(self, peer: _Peer) -> None:
        while True:
            while peer.snapshot is None:
                await peer.snapshot_ready.wait()
            msg, peer.snapshot = peer.snapshot, None
            peer.snapshot_ready = trio.Event()
            # If remove_peer cancels us mid-transfer, it reports this snapshot as failed.
            peer.snapshot_in_flight = True
            ok = False
            try:
                conn = await self._dial(peer.id, peer.address, StreamKind.SNAPSHOT)
                try:
                    ok = await send_snapshot(conn, msg, self.config)
                finally:
                    await conn.aclose()
            except CONNECTION_ERRORS as exc:
                log.warning(
                    "snapshot send failed node=%d peer=%d error=%s",
                    self.node_id,
                    peer.id,
                    _describe(exc),
                )
            peer.snapshot_in_flight = False
            if ok:
                self.stats.snapshots_sent += 1
            else:
                self.stats.snapshots_failed += 1
            self._on_snapshot_status(peer.id, ok)

    # ----------------------------------------------------------------------------------------
    # Inbound

    async def _handle_inbound(self, tcp: trio.SocketStream) -> None:
        if self._inbound >= self.config.max_inbound_connections:
            self.stats.inbound_rejected += 1
            await trio.aclose_forcefully(tcp)
            return
        self._inbound += 1
        try:
            await self._serve_connection(tcp)
        finally:
            self._inbound -= 1
            await trio.aclose_forcefully(tcp)

    async def _serve_connection(self, tcp: trio.SocketStream) -> None:
        cfg = self.config
        source = _peername(tcp)  # read it first: accept() closes the socket when it fails
        try:
            with trio.fail_after(cfg.handshake_timeout):
                conn, kind = await accept(
                    self.node_id,
                    tcp,
                    server_context=self._server_context,
                    max_frame_size=cfg.max_frame_size,
                    receive_size=cfg.receive_size,
                )
        except CONNECTION_ERRORS as exc:
            self.stats.inbound_rejected += 1
            log.info(
                "refused connection node=%d from=%s error=%s", self.node_id, source, _describe(exc)
            )
            return
        self.stats.inbound_accepted += 1
        try:
            if kind is StreamKind.MESSAGES:
                await self._receive_messages(conn)
            elif kind is StreamKind.APP:
                await self._answer_request(conn)
            else:
                count = await receive_snapshots(
                    conn, cfg, self._check_sender(conn.peer_id), self._deliver_snapshot
                )
                log.debug(
                    "snapshot stream done node=%d peer=%d count=%d",
                    self.node_id,
                    conn.peer_id,
                    count,
                )
        except (FrameError, PeerIdentityError) as exc:
            self.stats.inbound_rejected += 1
            log.warning(
                "closing connection node=%d peer=%d from=%s error=%s",
                self.node_id,
                conn.peer_id,
                source,
                _describe(exc),
            )
        except CONNECTION_ERRORS as exc:
            log.debug(
                "connection ended node=%d peer=%d error=%s",
                self.node_id,
                conn.peer_id,
                _describe(exc),
            )
        finally:
            await conn.aclose()

    def _check_sender(self, peer_id: int) -> Callable[[Message], None]:
        me = self.node_id

        def check(m: Message) -> None:
            if m.frm != peer_id:
                raise PeerIdentityError(f"node {peer_id} sent a message from {m.frm}")
            if m.to != me:
                raise FrameError(f"message for node {m.to} sent to node {me}")

        return check

    async def _deliver(self, msgs: list[Message]) -> None:
        result = self._on_messages(msgs)
        if result is not None:
            await result

    async def _deliver_snapshot(self, msg: Message) -> None:
        self.stats.snapshots_received += 1
        await self._deliver([msg])

    async def _answer_request(self, conn: FramedStream) -> None:
        if self._on_stream is not None:
            self.stats.requests_received += 1
            stream = AppStream(
                conn, max_body=self.config.max_frame_size, write_timeout=self.config.write_timeout
            )
            try:
                await self._on_stream(conn.peer_id, stream)
            except TransportError as exc:
                log.debug(
                    "stream ended node=%d peer=%d error=%s",
                    self.node_id,
                    conn.peer_id,
                    _describe(exc),
                )
            except Exception as exc:
                log.exception("stream handler failed node=%d peer=%d", self.node_id, conn.peer_id)
                raise FrameError(f"stream handler failed: {exc!r}") from exc
            return
        if self._on_request is None:
            raise FrameError("this node serves no APP requests")
        with trio.fail_after(self.config.handshake_timeout):
            frame = await conn.receive_frame()
        if frame is None:
            return
        frame_type, body = frame
        if frame_type is not FrameType.APP:
            raise FrameError(f"{frame_type.name} frame on an APP stream")
        self.stats.requests_received += 1
        try:
            reply = await self._on_request(conn.peer_id, body)
        except Exception as exc:
            # The application's bug or refusal ends this request, never the transport (whose
            # nursery also carries Raft).
            log.exception("request handler failed node=%d peer=%d", self.node_id, conn.peer_id)
            raise FrameError(f"request handler failed: {exc!r}") from exc
        await conn.send_all(codec.encode_frame(FrameType.APP, reply), self.config.write_timeout)

    async def _receive_messages(self, conn: FramedStream) -> None:
        peer_id = conn.peer_id
        check = self._check_sender(peer_id)
        # A peer keeps one message stream to us; a new one means the old one is dead (the peer
        # restarted or its connection half-broke), so close the old one now rather than
        # leaving it to a TCP timeout.
        scope = trio.CancelScope()
        old = self._inbound_streams.get(peer_id)
        if old is not None:
            old.cancel()
        self._inbound_streams[peer_id] = scope
        try:
            with scope:
                while True:
                    frame = await conn.receive_frame()
                    if frame is None:
                        return
                    frame_type, body = frame
                    if frame_type is not FrameType.MESSAGES:
                        raise FrameError(f"{frame_type.name} frame on a message stream")
                    msgs = codec.decode_messages(body)
                    for m in msgs:
                        check(m)
                    if msgs:
                        self.stats.messages_received += len(msgs)
                        await self._deliver(msgs)
        finally:
            if self._inbound_streams.get(peer_id) is scope:
                del self._inbound_streams[peer_id]


def parse_address(address: str) -> Address:
    """``"host:port"`` or ``"[v6addr]:port"`` as a ``(host, port)`` pair."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _peername(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


def _describe(exc: BaseException) -> str:
    # trio wraps ssl and socket errors (BrokenResourceError() with an empty message); the
    # cause is what an operator needs ("certificate verify failed", "connection refused").
    text = repr(exc)
    if exc.__cause__ is not None:
        text += f" caused by {exc.__cause__!r}"
    return text
