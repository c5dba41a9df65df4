"""Draining a service replica before its graceful stop.

A replica that stops gracefully (scale down, rolling update, user stop) is first taken out of
traffic: the state marks its job TERMINATING, and every ingress stops sending it new requests
once it applies that entry (and drops its pooled idle connections to it). The host running the
replica then waits until no TCP connection to the replica's port is ESTABLISHED -- the requests
in flight have finished -- before it sends SIGTERM: at least ``min_s`` (the ingresses learn of
the stop through the Raft apply, a moment later everywhere), at most the stop grace.

Connections are read from ``/proc/net/tcp`` and ``/proc/net/tcp6`` of this host's network
namespace (process jobs run on the host network), counting sockets whose *local* port is the
replica's port in state ESTABLISHED (``01``): the server side of every connection to the app,
whoever opened it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from meshgpu.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

PROC_NET_TCP = ("/proc/net/tcp", "/proc/net/tcp6")
ESTABLISHED = "01"
MIN_DRAIN_S = 0.5  # every ingress has applied the stop by then (normally)
POLL_S = 0.1


def established(port: int, tables: tuple[str, ...] = PROC_NET_TCP) -> int:
    """How many TCP connections with local port ``port`` are ESTABLISHED (blocking: reads
    ``/proc``; a missing table -- no IPv6 -- counts none)."""
    n = 0
    for path in tables:
        try:
            with open(path) as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split(None, 4)
                    if len(fields) < 4 or fields[3] != ESTABLISHED:
                        continue
                    _, _, local_port = fields[1].rpartition(":")
                    if int(local_port, 16) == port:
                        n += 1
        except OSError:
            continue
    return n


async def drain(
    port: int,
    max_s: float,
    *,
    min_s: float = MIN_DRAIN_S,
    poll_s: float = POLL_S,
    clock: Clock = SYSTEM_CLOCK,
    count: Callable[[int], int] = established,
) -> bool:
    """Wait until no connection to ``port`` is established, checked every ``poll_s`` from
    ``min_s`` on, for at most ``max_s`` in all. True: drained; False: the time ran out."""
    start = clock.now()
    deadline = start + max(0.0, max_s)
    await clock.sleep_until(min(start + min_s, deadline))
    while True:
        left = await trio.to_thread.run_sync(count, port)
        if not left:
            return True
        if clock.now() >= deadline:
            log.info(
                "port %d: %d connection(s) still open after %.1fs; stopping", port, left, max_s
            )
            return False
        await clock.sleep_until(min(clock.now() + poll_s, deadline))
