"""The callee side of the peer protocol: one ``on_stream`` for every ``APP`` connection of the
transport, gossip's included.

``PeerServer.handle(peer_id, stream)`` reads the first body (within ``first_timeout``) and
dispatches on its first byte: a gossip packet (anything not ``wire.MAGIC``) is answered by the
gossip handler in one body, as ``Transport.request`` expects; a peer-protocol CALL is checked
and run:

- **who**: ``peer_id`` is the node id in the caller's certificate (the transport checked it
  against the cluster CA), and it must be a current member of the replicated configuration
  (``is_member``): a removed member's certificate is still valid, its calls are refused (403).
  The API's bearer tokens play no part here.
- **how much**: at most ``max_streams`` calls at once (more are answered 503 at once, so a
  flood of followed logs cannot crowd out gossip and Raft, which have their own connections
  anyway); each op bounds its request body, and a reply body is bounded by its reader.
- **how long**: ``idle`` seconds for any expected frame; replies block while the caller is not
  reading (backpressure) for at most ``write_timeout`` (followed logs: ``log_write_timeout``).

Ops (``args`` are msgpack maps; ``→`` what the reply is):

    code.get   {sha}               → DATA (the archive) END {size}      404 if not here
    code.put   {sha} + DATA body   → END {sha256}                       (a pushed copy)
    logs       {run, job, follow}  → DATA ... END                       this host's log only
    metrics    {run, job}          → END {run, jobs}                    this host's jobs only
    history    {run, job, since_s, points} → END {run, jobs}            this host's history only
    join       {body}              → END {join reply}                   on the leader only
    secrets    {job}               → END {name: value}                  a voter; the job's host only

A handler refuses by raising an error of ``meshgpu.errors`` (the use cases' own: ``NotFound``,
``Denied``, ``Unavailable``, ...): the caller gets it as an ERROR frame naming its kind, and
raises the same kind. Anything else a handler raises is a 500 ``internal`` (logged here).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from consensus.transport import TransportError
from meshgpu.errors import Denied, MeshError, NotFound, Remote, Unavailable

from . import wire
from .wire import Channel, Kind, ProtocolError

log = logging.getLogger(__name__)

KEEPALIVE_S = 10.0
"""A followed log that has been quiet this long sends an empty DATA frame, so the caller can
tell a quiet job from a dead peer (its ``idle`` is longer)."""
JOIN_BODY_LIMIT = 64 * 1024
HISTORY_MAX_POINTS = 2000  # meshgpu.ops.history.MAX_POINTS: what one answer may hold


@dataclass(frozen=True, slots=True)
class PeerHandlers:
    """What this host answers with; each is plain async code with no transport in it."""

    is_member: Callable[[int], bool]
    gossip: Callable[[int, bytes], Awaitable[bytes]]
    code_path: Callable[[str], Path | None]
    """The archive's path if this host holds it (``None``: it does not; raise for a bad sha)."""
    code_put: Callable[[bytes, str], Awaitable[Any]]
    code_limit: int
    logs: Callable[[str, int, bool], AsyncIterator[bytes]]
    metrics: Callable[[str, int | None], Awaitable[dict[str, Any]]]
    admit: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
    # (caller's Raft id, job id) -> the secret values the job needs (``AccessOps.
    # resolve_for_job``: only to the job's own host); None: this host answers none.
    secrets: Callable[[int, str], Awaitable[dict[str, str]]] | None = None
    # (run, job, since_s, points) -> this host's metrics history of the job; None: not kept
    history: Callable[[str, int, float, int], Awaitable[dict[str, Any]]] | None = None
    # the leader's answer to a follower's ``meshgpu offer`` (backends' offers); None: refused
    backend_offers: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None


class PeerServer:
    def __init__(
        self,
        handlers: PeerHandlers | None = None,
        *,
        max_streams: int = 64,
        first_timeout: float = 5.0,
        idle: float = 30.0,
        log_write_timeout: float = 300.0,
    ) -> None:
        self.h = handlers  # None until ``serve``: streams are closed unanswered meanwhile
        self.max_streams = max_streams
        self.first_timeout = first_timeout
        self.idle = idle
        self.log_write_timeout = log_write_timeout
        self.active = 0
        self.stats = {"calls": 0, "refused": 0, "busy": 0, "errors": 0, "gossip": 0}
        self._ops: dict[str, Callable[[PeerHandlers, Channel, dict[str, Any]], Awaitable[None]]] = {
            "code.get": self._code_get,
            "code.put": self._code_put,
            "logs": self._logs,
            "metrics": self._metrics,
            "join": self._join,
            "secrets": self._secrets,
            "history": self._history,
            "backend_offers": self._backend_offers,
        }

    def serve(self, handlers: PeerHandlers) -> None:
        """Answer with ``handlers`` from now on (the transport runs before the use cases
        exist: until then a stream is closed unanswered, as a busy or starting host's is)."""
        self.h = handlers

    async def handle(self, peer_id: int, ch: Channel) -> None:
        """The transport's ``on_stream``."""
        if self.h is None:
            return
        h = self.h
        try:
            first = await ch.receive(timeout=self.first_timeout)
        except trio.TooSlowError:
            return
        if first is None:
            return
        if not wire.is_peer_body(first):
            self.stats["gossip"] += 1
            await ch.send(await h.gossip(peer_id, first))
            return
        try:
            kind, payload = wire.parse(first)
            if kind is not Kind.CALL:
                raise ProtocolError(f"a stream opens with CALL, not {kind.name}")
            op, args = wire.decode_call(payload)
            run = self._ops.get(op)
            if run is None:
                raise NotFound("unknown peer call", f"no op {op!r}", "unknown_op")
            if not h.is_member(peer_id):
                self.stats["refused"] += 1
                log.warning("peer call %s from node %d refused: not a current member", op, peer_id)
                raise Denied("not a member", f"node {peer_id} is not a member", "denied")
            if self.active >= self.max_streams:
                self.stats["busy"] += 1
                raise Unavailable("too many peer calls", "retry shortly", "unavailable")
        except MeshError as err:
            await wire.send_error(ch, err)
            return
        self.stats["calls"] += 1
        self.active += 1
        try:
            if op == "secrets":
                args = {**args, "_caller": peer_id}
            await run(h, ch, args)
        except Exception as caught:
            exc = caught
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]  # a refusal raised in a handler's own task
            if isinstance(exc, MeshError):
                err = exc
            else:
                self.stats["errors"] += 1
                if isinstance(exc, TransportError):
                    return  # the stream broke: there is no one to tell
                log.error("peer call %s from node %d failed", op, peer_id, exc_info=caught)
                err = Remote(500, "internal error", type(exc).__name__, "internal")
            with contextlib.suppress(Exception):  # the stream may be what failed
                await wire.send_error(ch, err)
        finally:
            self.active -= 1

    # -- ops ----------------------------------------------------------------------------------

    async def _no_body(self, ch: Channel) -> None:
        await wire.read_body(ch, idle=self.idle, cap=0)

    async def _code_get(self, h: PeerHandlers, ch: Channel, args: dict[str, Any]) -> None:
        sha = _str(args, "sha")
        await self._no_body(ch)
        path = h.code_path(sha)
        if path is None:
            raise NotFound("unknown code archive", f"this node has no {sha}", "not_found")
        size = 0
        try:
            f = await trio.open_file(path, "rb")
        except FileNotFoundError:
            raise NotFound("unknown code archive", f"this node has no {sha}", "not_found") from None
        async with f:
            while chunk := await f.read(4 * wire.CHUNK):
                size += len(chunk)
                await wire.send_data(ch, chunk)
        await wire.send_end(ch, {"size": size})

    async def _code_put(self, h: PeerHandlers, ch: Channel, args: dict[str, Any]) -> None:
        sha = _str(args, "sha")
        data = await wire.read_body(ch, idle=self.idle, cap=h.code_limit)
        stored = await h.code_put(data, sha)
        await wire.send_end(ch, {"sha256": stored})

    async def _logs(self, h: PeerHandlers, ch: Channel, args: dict[str, Any]) -> None:
        run, job, follow = _str(args, "run"), _int(args, "job"), bool(args.get("follow"))
        await self._no_body(ch)
        chunks = h.logs(run, job, follow)
        # The log is read in a task of its own, so that a quiet followed job can be told from
        # a dead peer (a keepalive) without cancelling the reader in the middle of a read.
        send, receive = trio.open_memory_channel[bytes](1)

        async def read() -> None:
            async with send, aclosing(chunks):
                async for chunk in chunks:
                    await send.send(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            while True:
                chunk = b""  # nothing for a while: an empty DATA frame says "still here"
                with trio.move_on_after(KEEPALIVE_S if follow else math.inf):
                    try:
                        chunk = await receive.receive()
                    except trio.EndOfChannel:
                        break
                if chunk:
                    await wire.send_data(ch, chunk, timeout=self.log_write_timeout)
                else:
                    await ch.send(wire.frame(Kind.DATA), timeout=self.log_write_timeout)
        await wire.send_end(ch)

    async def _metrics(self, h: PeerHandlers, ch: Channel, args: dict[str, Any]) -> None:
        run, job = _str(args, "run"), args.get("job")
        if job is not None and type(job) is not int:
            raise ProtocolError("job is an integer or null")
        await self._no_body(ch)
        await wire.send_end(ch, await h.metrics(run, job))

    async def _history(self, h: PeerHandlers, ch: Channel, args: dict[str, Any]) -> None:
        run, job = _str(args, "run"), args.get("job")
        since_s, points = args.get("since_s"), args.get("points")
        if type(job) is not int:
            raise ProtocolError("job is an integer")
        if type(since_s) not in (int, float) or not 0 < since_s <= 31 * 86400:
            raise ProtocolError("since_s is a number of seconds, 0 < since_s <= 31 days")
        if type(points) is not int or not 1 <= points <= HISTORY_MAX_POINTS:
            raise ProtocolError(f"points is an integer 1..{HISTORY_MAX_POINTS}")
        await self._no_body(ch)
        if h.history is None:
            raise NotFound("no metrics history", "this host keeps no metrics history", "not_found")
        await wire.send_end(ch, await h.history(run, job, float(since_s), points))

    async def _join(self, h: PeerHandlers, ch: Channel, args: dict[str, Any]) -> None:
        body = args.get("body")
        if not isinstance(body, dict):
            raise ProtocolError("join takes {body: {...}}")
        await self._no_body(ch)
        await wire.send_end(ch, await h.admit(body))

    async def _secrets(self, h: PeerHandlers, ch: Channel, args: dict[str, Any]) -> None:
        job = _str(args, "job")
        await self._no_body(ch)
        if h.secrets is None:
            raise Unavailable("no secrets here", "this member serves no secrets", "unavailable")
        await wire.send_end(ch, await h.secrets(int(args["_caller"]), job))

    async def _backend_offers(self, h: PeerHandlers, ch: Channel, args: dict[str, Any]) -> None:
        body = args.get("body")
        if not isinstance(body, dict):
            raise ProtocolError("backend_offers takes {body: {...}}")
        await self._no_body(ch)
        if h.backend_offers is None:
            raise Unavailable("no backends here", "this member answers no offers", "not_leader")
        await wire.send_end(ch, await h.backend_offers(body))


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or len(value) > 1024:
        raise ProtocolError(f"{key} is a string")
    return value


def _int(args: dict[str, Any], key: str) -> int:
    value = args.get(key)
    if type(value) is not int:
        raise ProtocolError(f"{key} is an integer")
    return value
