"""Connections to service replicas: HTTP/1.1 spoken with ``h11`` over trio TCP streams, kept
alive in a pool per replica address (most recently used first), and the outstanding-request
counts the balancer reads.

Why not ``httpcore``: its pool walks every connection of every origin on each request and its
locking costs more than the exchange itself at this proxy's rates; one plain list per replica
is all an ingress needs, and it lets the ingress drop exactly the idle connections to replicas
that stop receiving traffic (a draining replica's host waits for them to go)."""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from dataclasses import dataclass, field

import h11
import trio

CONNECT_TIMEOUT_S = 10.0
IDLE_EXPIRY_S = 30.0  # an idle connection older than this is closed rather than reused
MAX_IDLE_PER_REPLICA = 256
READ_SIZE = 65536
MAX_HEADERS = 64 << 10


class ConnectFailed(Exception):
    """No connection to the replica could be made: the request was never sent (retryable)."""


class Conn:
    __slots__ = ("address", "h11", "stream", "used_at")

    def __init__(self, address: tuple[str, int], stream: trio.SocketStream) -> None:
        self.address = address
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADERS)
        self.used_at = time.monotonic()

    def alive(self) -> bool:
        """An idle connection the replica has not closed (readable while idle: an EOF, or
        stray bytes, either way not reusable; polled without blocking)."""
        poller = select.poll()
        try:
            poller.register(self.stream.socket.fileno(), select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    def close_now(self) -> None:
        """Close without awaiting (a plain socket close: no TLS here)."""
        try:
            self.stream.socket.close()
        except OSError:
            pass


@dataclass
class _Replica:
    idle: list[Conn] = field(default_factory=list)
    outstanding: int = 0
    failed_until: float = 0.0


class Pool:
    """Keep-alive connections and load per replica address."""

    def __init__(self) -> None:
        self.replicas: dict[tuple[str, int], _Replica] = {}

    def _get(self, address: tuple[str, int]) -> _Replica:
        r = self.replicas.get(address)
        if r is None:
            r = self.replicas[address] = _Replica()
        return r

    def outstanding(self, address: tuple[str, int]) -> int:
        r = self.replicas.get(address)
        return r.outstanding if r is not None else 0

    def failed(self, address: tuple[str, int], now: float) -> bool:
        r = self.replicas.get(address)
        return r is not None and r.failed_until > now

    def begin(self, address: tuple[str, int]) -> None:
        self._get(address).outstanding += 1

    def end(self, address: tuple[str, int]) -> None:
        r = self.replicas.get(address)
        if r is not None:
            r.outstanding -= 1

    async def connect(self, address: tuple[str, int]) -> Conn:
        """A pooled idle connection to ``address``, or a new one (``ConnectFailed``)."""
        r = self._get(address)
        now = time.monotonic()
        while r.idle:
            conn = r.idle.pop()
            if now - conn.used_at < IDLE_EXPIRY_S and conn.alive():
                return conn
            conn.close_now()
        # Replica hosts are addresses (internal IPs): one plain connect, no name lookup.
        sock = trio.socket.socket(
            socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM
        )
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                await sock.connect(address)
        except (OSError, trio.TooSlowError) as e:
            sock.close()
            r.failed_until = time.monotonic() + 2.0
            raise ConnectFailed(f"{address[0]}:{address[1]}: {_reason(e)}") from None
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Conn(address, trio.SocketStream(sock))

    def release(self, conn: Conn) -> None:
        """Back to the pool if it can carry another request, closed otherwise."""
        h = conn.h11
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            r = self._get(conn.address)
            if len(r.idle) < MAX_IDLE_PER_REPLICA:
                conn.used_at = time.monotonic()
                r.idle.append(conn)
                return
        conn.close_now()

    def sweep(self, routable: set[tuple[str, int]]) -> int:
        """Close idle connections to replicas that receive no traffic (and expired ones);
        forget replicas with nothing left. Returns how many connections were closed."""
        closed = 0
        now = time.monotonic()
        for address in list(self.replicas):
            r = self.replicas[address]
            keep = address in routable
            left = []
            for conn in r.idle:
                if keep and now - conn.used_at < IDLE_EXPIRY_S:
                    left.append(conn)
                else:
                    conn.close_now()
                    closed += 1
            r.idle = left
            if not keep and not r.idle and r.outstanding <= 0 and r.failed_until < now:
                del self.replicas[address]
        return closed

    def close_all(self) -> None:
        for r in self.replicas.values():
            for conn in r.idle:
                conn.close_now()
            r.idle = []


def _reason(e: BaseException) -> str:
    if isinstance(e, trio.TooSlowError):
        return "connect timed out"
    if isinstance(e, OSError) and e.errno is not None:
        return "connection refused" if e.errno == errno.ECONNREFUSED else os.strerror(e.errno)
    return str(e) or type(e).__name__


__all__ = ["ConnectFailed", "Conn", "Pool"]
