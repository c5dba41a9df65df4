"""The trio shell around one :class:`~.core.Gossip`: a UDP socket, the timers, reliable streams.

Task tree (all under :meth:`GossipShell.run`)::

    GossipShell.run
    ├── timers     sleep until core.next_deadline() (or a poke) → core.tick(now) → dispatch
    ├── receiver   recvfrom → keyring.open → core.receive → dispatch       (bad packets: counted)
    ├── sender     bounded queue of sealed datagrams → sendto                (full queue: dropped)
    └── streams    one task per stream the core asks for (at most ``max_streams`` at once):
                   Streams.request(to, packet) → core.receive(reply) → dispatch

"dispatch" seals each datagram with the primary key and queues it, starts a task per stream
request, logs and forwards the core's membership events, and pokes the timer task because any
call may have moved the core's next deadline earlier.

Every core call is synchronous and trio is single-threaded, so the core is only ever touched
between awaits, by whichever task holds the CPU: no call interleaves with another (this is the
"one owner" rule in trio form; nothing here runs in a thread).

Security: datagrams are sealed with the cluster's gossip keys (:mod:`.keyring`); a packet that
does not open -- from a host never admitted, or from another cluster -- is dropped and counted
before the core sees it. Streams are not sealed here: the :class:`Streams` implementation must
authenticate its peers itself (meshgpu's, :class:`TransportStreams`, rides the Raft transport's
mutual TLS). Nothing a peer sends can stop the shell: undecodable packets, failed or slow
streams and full queues are counted in :attr:`GossipShell.stats` and dropped.
"""

from __future__ import annotations

import logging
import math
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import trio

from consensus.transport import Transport, TransportError

from .core import Gossip, Outgoing
from .errors import DecodeError, GossipError
from .events import EventKind, MemberEvent
from .keyring import Keyring
from .members import MemberInfo
from .messages import Addr, Meta

log = logging.getLogger(__name__)

_RECEIVE_SIZE = 65536
_NO_ADDR: Addr = ("", 0)


class StreamError(GossipError):
    """A stream exchange failed: the peer is unknown, unreachable, not authenticated, or did not
    answer in time. The core treats it as a lost packet."""


class Streams(Protocol):
    """Reliable, authenticated request/response to a member's gossip address."""

    async def request(self, to: Addr, data: bytes, timeout: float) -> bytes:
        """Send one packet to the member at ``to`` and return its reply (``b""``: none).
        Raises :class:`StreamError`."""
        ...


class GossipShell:
    """Runs ``core`` on a UDP socket bound to ``host:port`` (port 0: any free port).

    ``keyring`` seals and opens datagrams (replace it with :meth:`set_keyring` to rotate keys);
    ``streams`` carries push/pull exchanges and fallback pings. ``leave_on_exit``: when
    :meth:`run` is cancelled, first announce a graceful leave (for up to ``leave_timeout``
    seconds) so that peers record *left* rather than *dead*. ``on_event`` is called with every
    membership event of the core, in order."""

    def __init__(
        self,
        core: Gossip,
        keyring: Keyring,
        streams: Streams,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_streams: int = 16,
        send_queue: int = 512,
        leave_on_exit: bool = True,
        leave_timeout: float = 2.0,
        on_event: Callable[[MemberEvent], None] | None = None,
        on_plain: Callable[[bytes], bytes | None] | None = None,
        plain_rate: float = 20.0,
    ) -> None:
        self.core = core
        # Unsealed datagrams the embedding application answers itself (the agent: "where is
        # your API?", see meshgpu/mesh/join.py), at most ``plain_rate`` answers a second.
        self._on_plain = on_plain
        self._plain_rate = plain_rate
        self._plain_budget = plain_rate
        self._plain_at = 0.0
        self._keyring = keyring
        self._streams = streams
        self._host = host
        self._port = port
        self._max_streams = max_streams
        self._in_flight = 0
        self.leave_on_exit = leave_on_exit
        self._leave_timeout = leave_timeout
        self._on_event = on_event
        self._send, self._outbox = trio.open_memory_channel[tuple[Addr, bytes]](send_queue)
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.started_at: float | None = None
        """When :meth:`run` started serving (trio clock), ``None`` before."""
        self.stats: Counter[str] = Counter()
        """Counters of the shell's I/O (``ticks``, ``datagrams_in``, ``datagrams_out``,
        ``bad_auth``, ``bad_packets``, ``datagrams_dropped``, ``send_errors``,
        ``receive_errors``, ``streams_out``, ``stream_failures``, ``streams_dropped``,
        ``streams_in``, ``bad_stream_packets``); the core's protocol counters are in
        ``core.stats``."""

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound UDP port (meaningful once :meth:`run` has started)."""
        return self._port

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, then serve until cancelled: ``port = await nursery.start(shell.run)``."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        try:
            await sock.bind((self._host, self._port))
            self._port = sock.getsockname()[1]
            self.started_at = trio.current_time()
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._timers)
                    nursery.start_soon(self._receiver, sock)
                    nursery.start_soon(self._sender, sock)
                    self._dispatch(self.core.tick(trio.current_time()))  # starts the core
                    log.info(
                        "gossip listening member=%s udp=%s:%d", self.core.id, self._host, self._port
                    )
                    task_status.started(self._port)
            finally:
                self._nursery = None
                if self.leave_on_exit:
                    with trio.CancelScope(shield=True) as scope:
                        scope.deadline = trio.current_time() + self._leave_timeout
                        await self._leave(sock)
        finally:
            sock.close()

    async def _leave(self, sock: trio.socket.SocketType) -> None:
        """Broadcast this member's departure and keep ticking (sending directly: the sender
        task is gone) until the core says the news is out, or the caller's deadline."""
        core = self.core
        outgoing = core.leave(trio.current_time())
        while True:
            for out in outgoing:
                if not out.stream:
                    try:
                        await sock.sendto(self._keyring.seal(out.data), out.to)
                        self.stats["datagrams_out"] += 1
                    except OSError:
                        self.stats["send_errors"] += 1
            self._events()
            if core.leave_done:
                return
            deadline = core.next_deadline()
            if deadline is None:
                return
            await trio.sleep_until(deadline)
            outgoing = core.tick(trio.current_time())

    # ------------------------------------------------------------------ public API

    def join(self, seeds: list[Addr]) -> None:
        """Push/pull with each of ``seeds`` (members' gossip addresses) to join their cluster."""
        self._dispatch(self.core.join(trio.current_time(), seeds))

    def update_meta(self, meta: Meta) -> None:
        """New metadata for this member (disseminated with its next datagrams). Raises
        :class:`~.errors.MetaTooLarge`."""
        self.core.update_meta(meta)
        self._after_call()

    def set_keyring(self, keyring: Keyring) -> None:
        """Rotate keys: seal with the new primary from now on, open with any key of the ring."""
        self._keyring = keyring

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    def members(self) -> list[MemberInfo]:
        return self.core.members()

    def member(self, member_id: str) -> MemberInfo | None:
        return self.core.member(member_id)

    def handle_stream(self, data: bytes) -> bytes:
        """Answer a packet that arrived on an accepted (authenticated) stream: the reply packet,
        ``b""`` for none. A bad packet is counted and answered with nothing."""
        self.stats["streams_in"] += 1
        try:
            reply = self.core.receive_stream(trio.current_time(), _NO_ADDR, data)
        except DecodeError as exc:
            self.stats["bad_stream_packets"] += 1
            log.debug("dropped a bad stream packet: %s", exc)
            return b""
        self._after_call()
        return reply or b""

    # ------------------------------------------------------------------ tasks

    async def _timers(self) -> None:
        core = self.core
        while True:
            deadline = core.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            self.stats["ticks"] += 1
            # No poke: this loop re-reads the deadline anyway (a poke would spin it).
            self._dispatch(core.tick(trio.current_time()), wake=False)

    async def _receiver(self, sock: trio.socket.SocketType) -> None:
        core, stats = self.core, self.stats
        while True:
            try:
                data, source = await sock.recvfrom(_RECEIVE_SIZE)
            except OSError as exc:  # e.g. an ICMP error reported on the socket: not fatal
                stats["receive_errors"] += 1
                log.debug("gossip receive error: %s", exc)
                await trio.sleep(0.01)  # never a tight loop, should the error persist
                continue
            stats["datagrams_in"] += 1
            try:
                packet = self._keyring.open(data)
            except DecodeError:
                if not self._answer_plain(data, source):
                    stats["bad_auth"] += 1
                continue
            try:
                out = core.receive(trio.current_time(), (source[0], source[1]), packet)
            except DecodeError as exc:
                stats["bad_packets"] += 1
                log.debug("dropped a bad gossip packet from %s: %s", source[0], exc)
                continue
            self._dispatch(out)

    def _answer_plain(self, data: bytes, source: Any) -> bool:
        """Queue the application's answer to an unsealed datagram; True if it had one."""
        if self._on_plain is None:
            return False
        reply = self._on_plain(data)
        if reply is None:
            return False
        now = trio.current_time()
        self._plain_budget = min(
            self._plain_rate, self._plain_budget + (now - self._plain_at) * self._plain_rate
        )
        self._plain_at = now
        if self._plain_budget >= 1.0:
            self._plain_budget -= 1.0
            try:
                self._send.send_nowait(((source[0], source[1]), reply))
            except trio.WouldBlock:
                self.stats["datagrams_dropped"] += 1
        self.stats["plain_answered"] += 1
        return True

    async def _sender(self, sock: trio.socket.SocketType) -> None:
        async for to, data in self._outbox:
            try:
                await sock.sendto(data, to)
                self.stats["datagrams_out"] += 1
            except OSError as exc:  # unroutable address, no such host: that packet is lost
                self.stats["send_errors"] += 1
                log.debug("gossip send to %s:%s failed: %s", to[0], to[1], exc)

    async def _exchange(self, out: Outgoing) -> None:
        stats = self.stats
        try:
            stats["streams_out"] += 1
            deadline = out.deadline
            if deadline is None:
                deadline = trio.current_time() + self.core.config.tcp_timeout
            try:
                with trio.fail_at(deadline):
                    reply = await self._streams.request(
                        out.to, out.data, max(0.0, deadline - trio.current_time())
                    )
            except (StreamError, trio.TooSlowError, OSError, ValueError) as exc:
                # ValueError: an address a peer gossiped that cannot even be dialled (a host
                # label over 63 characters...): a failed exchange, never the shell's end.
                stats["stream_failures"] += 1
                log.debug("gossip stream to %s:%s failed: %s", out.to[0], out.to[1], exc)
                return
            if not reply:
                return
            try:
                result = self.core.receive(trio.current_time(), out.to, reply)
            except DecodeError as exc:
                stats["bad_stream_packets"] += 1
                log.debug("bad stream reply from %s:%s: %s", out.to[0], out.to[1], exc)
                return
            self._dispatch(result)
        finally:
            self._in_flight -= 1

    # ------------------------------------------------------------------ plumbing

    def _dispatch(self, outgoing: list[Outgoing], *, wake: bool = True) -> None:
        for out in outgoing:
            if out.stream:
                if self._nursery is None or self._in_flight >= self._max_streams:
                    self.stats["streams_dropped"] += 1
                    continue
                self._in_flight += 1
                self._nursery.start_soon(self._exchange, out)
            else:
                try:
                    self._send.send_nowait((out.to, self._keyring.seal(out.data)))
                except trio.WouldBlock:
                    self.stats["datagrams_dropped"] += 1
        self._after_call(wake)

    def _after_call(self, wake: bool = True) -> None:
        self._events()
        if wake:
            self._wake.set()  # the next deadline may have moved earlier

    def _events(self) -> None:
        for event in self.core.events():
            m = event.member
            level = logging.INFO
            if event.kind in (EventKind.SUSPECT, EventKind.DEAD):
                level = logging.WARNING
            elif event.kind is EventKind.UPDATED:
                level = logging.DEBUG
            log.log(
                level,
                "gossip member=%s event=%s incarnation=%d addr=%s:%d view=%s",
                m.id,
                event.kind.value,
                m.incarnation,
                m.addr[0],
                m.addr[1],
                self.core.id,
            )
            if self._on_event is not None:
                self._on_event(event)


class TransportStreams:
    """Gossip streams as ``APP`` requests on the Raft transport: the same TCP port and the same
    mutual TLS as Raft, so only a host holding a certificate of the cluster CA can push or pull
    state, and each side knows the other's node id from its certificate.

    The transport dials by Raft id (the TLS hostname check names the node), so ``resolve`` maps
    a member's gossip address to the Raft id that holds it (``None``: unknown, the exchange
    fails like a lost packet)."""

    def __init__(self, transport: Transport, resolve: Callable[[Addr], int | None]) -> None:
        self._transport = transport
        self._resolve = resolve

    async def request(self, to: Addr, data: bytes, timeout: float) -> bytes:
        peer = self._resolve(to)
        if peer is None:
            raise StreamError(f"no node known at {to[0]}:{to[1]}")
        try:
            return await self._transport.request(peer, data, address=to, timeout=timeout)
        except TransportError as exc:
            raise StreamError(str(exc)) from exc
