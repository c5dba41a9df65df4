"""The caller side of the peer protocol: ``PeerClient``, one per agent, for every node-to-node
call that is not Raft or gossip -- code archives, log and metric proxying, join forwarding.

Each call dials a fresh ``APP`` connection of the mutual-TLS transport to the member (by node
id: ``locate`` gives its Raft id, which the TLS check names, and its peer address), so it is
authenticated by certificates both ways, never queues behind Raft or another call, and holds no
API token. Failures are ``meshgpu.errors``: the callee's refusal as the kind it gave (a
``NotFound``, a ``Denied``, ...; ``Remote`` with its status for any other), or ``Unavailable``
when the member could not be reached or answered too late. ``PeerClient`` is what the use cases
(``meshgpu/ops``) are given as their ``Peers``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import trio

from consensus.transport import Transport, TransportError, parse_address
from meshgpu.errors import MeshError, NotFound, Remote, TooLarge
from meshgpu.runner.code import CodeUnavailable, Source

from . import wire
from .wire import Channel, unreachable

if TYPE_CHECKING:
    from meshgpu.state.cluster import ClusterState

Address = tuple[str, int]


def members_of(cluster: ClusterState) -> Callable[[str], tuple[int, Address] | None]:
    """``PeerClient``'s ``locate`` over the replicated configuration: a current member's Raft
    id (which its certificate names) and peer address, by node id."""

    def locate(node_id: str) -> tuple[int, Address] | None:
        for m in cluster.members.values():
            if m.node_id == node_id and not m.removed and m.peer_address:
                return m.raft_id, parse_address(m.peer_address)
        return None

    return locate


class PeerClient:
    """``transport``: the agent's transport (``None`` until it runs); ``locate(node_id)``: the
    member's ``(raft_id, (host, port))``, ``None`` when it is not a current member."""

    def __init__(
        self,
        transport: Callable[[], Transport | None],
        locate: Callable[[str], tuple[int, Address] | None],
        *,
        idle: float = 30.0,
        follow_idle: float = 60.0,
    ) -> None:
        self._transport = transport
        self._locate = locate
        self.idle = idle
        self.follow_idle = follow_idle

    @asynccontextmanager
    async def _call(
        self, node_id: str, op: str, args: dict[str, Any], *, body_follows: bool = False
    ) -> AsyncIterator[Channel]:
        transport = self._transport()
        if transport is None:
            raise unreachable("this node's peer transport is not running yet")
        where = self._locate(node_id)
        if where is None:
            raise unreachable(f"node {node_id} is not a member with a peer address")
        raft_id, address = where
        try:
            async with transport.open_stream(raft_id, address=address) as stream:
                await stream.send(wire.encode_call(op, args))
                if not body_follows:
                    await wire.send_end(stream)
                yield stream
        except TransportError as exc:
            raise unreachable(str(exc)) from exc

    async def fetch_code(self, node_id: str, sha: str, cap: int, *, timeout: float) -> bytes:
        """The archive ``sha`` from ``node_id``, at most ``cap`` bytes (``NotFound``: the
        member does not have it; ``TooLarge``: it sent more). The caller checks the SHA-256."""
        with _deadline(timeout):
            async with self._call(node_id, "code.get", {"sha": sha}) as ch:
                return await wire.read_body(ch, idle=self.idle, cap=cap)

    async def push_code(self, node_id: str, sha: str, data: bytes, *, timeout: float) -> str:
        """Store a copy of the archive on ``node_id``; returns the SHA-256 it stored."""
        with _deadline(timeout):
            async with self._call(node_id, "code.put", {"sha": sha}, body_follows=True) as ch:

                async def upload() -> None:
                    # A refusal (over the callee's limit, a full disk) may come while the body
                    # is still going out: the reply is read meanwhile, and ends the upload.
                    with contextlib.suppress(TransportError, trio.BrokenResourceError):
                        await wire.send_data(ch, data)
                        await wire.send_end(ch)

                refused: MeshError | None = None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(upload)
                    try:
                        result = await wire.read_result(ch, idle=self.idle)
                    except MeshError as e:  # raised out here, not in an exception group
                        refused = e
                    finally:
                        nursery.cancel_scope.cancel()
                if refused is not None:
                    raise refused
        return str((result or {}).get("sha256", ""))

    async def logs(self, node_id: str, run: str, job: int, follow: bool) -> AsyncIterator[bytes]:
        """The job's log as ``node_id`` has it, as it is written (``follow``: until the job
        ends there). No overall deadline: a followed log lasts as long as the job; a member that
        sends nothing, not even its keepalive, for ``follow_idle`` seconds has gone."""
        args = {"run": run, "job": job, "follow": follow}
        async with self._call(node_id, "logs", args) as ch:
            idle = self.follow_idle if follow else self.idle
            async for chunk in wire.iter_data(ch, idle=idle):
                yield chunk

    async def metrics(
        self, node_id: str, run: str, job: int | None, *, timeout: float
    ) -> dict[str, Any]:
        """``node_id``'s own sample of the run's jobs there (the API's ``local=true`` answer)."""
        with _deadline(timeout):
            async with self._call(node_id, "metrics", {"run": run, "job": job}) as ch:
                result = await wire.read_result(ch, idle=self.idle)
        if not isinstance(result, dict):
            raise Remote(502, "bad metrics reply", f"node {node_id} sent {type(result).__name__}")
        return result

    async def history(
        self, node_id: str, run: str, job: int, since_s: float, points: int, *, timeout: float
    ) -> dict[str, Any]:
        """``node_id``'s own metrics history of the run's job there (``ops/history.py``)."""
        args = {"run": run, "job": job, "since_s": since_s, "points": points}
        with _deadline(timeout):
            async with self._call(node_id, "history", args) as ch:
                result = await wire.read_result(ch, idle=self.idle)
        if not isinstance(result, dict):
            raise Remote(502, "bad history reply", f"node {node_id} sent {type(result).__name__}")
        return result

    async def join(self, node_id: str, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """Forward a join request to the leader ``node_id``; its answer or its refusal."""
        with _deadline(timeout):
            async with self._call(node_id, "join", {"body": body}) as ch:
                result = await wire.read_result(ch, idle=timeout)
        if not isinstance(result, dict):
            raise Remote(502, "bad join reply", f"node {node_id} sent {type(result).__name__}")
        return result

    async def secrets(self, node_id: str, job_id: str, *, timeout: float) -> dict[str, str]:
        """The secret values ``job_id`` (a job of this host) needs, from the voter
        ``node_id``, which checks that the job is ours."""
        with _deadline(timeout):
            async with self._call(node_id, "secrets", {"job": job_id}) as ch:
                result = await wire.read_result(ch, idle=self.idle)
        if not isinstance(result, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in result.items()
        ):
            raise Remote(502, "bad secrets reply", f"node {node_id} sent no name -> value map")
        return result

    async def backend_offers(
        self, node_id: str, body: dict[str, Any], *, timeout: float
    ) -> dict[str, Any]:
        """The backends' offers, asked of the leader ``node_id``."""
        with _deadline(timeout):
            async with self._call(node_id, "backend_offers", {"body": body}) as ch:
                result = await wire.read_result(ch, idle=timeout)
        if not isinstance(result, dict):
            raise Remote(502, "bad offers reply", f"node {node_id} sent {type(result).__name__}")
        return result


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """``Unavailable`` once ``seconds`` have passed."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise unreachable(f"no answer within {seconds:g}s") from None


class PeerCodeLink:
    """``meshgpu.runner.code.CodeLink`` over a ``PeerClient``: what the code store uses."""

    def __init__(self, client: PeerClient) -> None:
        self.client = client

    async def fetch(self, src: Source, sha: str, cap: int, timeout: float) -> bytes:
        try:
            return await self.client.fetch_code(src.node_id, sha, cap, timeout=timeout)
        except NotFound:
            raise CodeUnavailable("does not have it") from None
        except TooLarge:
            raise CodeUnavailable(f"sent more than the archive's {cap} bytes") from None
        except MeshError as e:
            raise CodeUnavailable(str(e)) from None

    async def push(self, src: Source, sha: str, data: bytes, timeout: float) -> None:
        try:
            stored = await self.client.push_code(src.node_id, sha, data, timeout=timeout)
        except MeshError as e:
            raise CodeUnavailable(f"refused ({e.title}: {e})") from None
        if stored != sha:
            raise CodeUnavailable(f"stored {stored[:12]!r} instead")
