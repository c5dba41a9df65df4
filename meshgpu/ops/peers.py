"""What the use cases ask of other members, and what this host answers them: the peer port's
calls (``meshgpu/peer``) seen from the use cases' side.

``Peers`` is the interface the use cases are given (``meshgpu.peer.PeerClient`` in the agent, a
fake in tests); it raises ``meshgpu.errors`` -- the other member's refusal as the kind it gave,
``Unavailable`` when it could not be reached. ``answers`` builds the ``PeerHandlers`` a
``PeerServer`` runs from the use cases themselves, so a call over the peer port is served by the
same code (and refused with the same errors) as the API's request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from meshgpu.errors import Unavailable
from meshgpu.peer import PeerHandlers

if TYPE_CHECKING:
    from meshgpu.ops import Services
    from meshgpu.state.cluster import ClusterState


class Peers(Protocol):
    """Calls to another member (by node id) over the mutual-TLS peer port."""

    def logs(self, node_id: str, run: str, job: int, follow: bool) -> AsyncIterator[bytes]:
        """The job's log as ``node_id`` has it (``follow``: until the job ends there)."""
        ...

    async def metrics(
        self, node_id: str, run: str, job: int | None, *, timeout: float
    ) -> dict[str, Any]:
        """``node_id``'s own sample of the run's jobs there."""
        ...

    async def join(self, node_id: str, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """A join request forwarded to the leader ``node_id``: its answer."""
        ...

    async def history(
        self, node_id: str, run: str, job: int, since_s: float, points: int, *, timeout: float
    ) -> dict[str, Any]:
        """``node_id``'s own metrics history of the run's job there."""
        ...

    async def backend_offers(
        self, node_id: str, body: dict[str, Any], *, timeout: float
    ) -> dict[str, Any]:
        """The backends' offers, asked of the leader ``node_id`` (it opens the credentials)."""
        ...


def answers(
    services: Services,
    cluster: ClusterState,
    gossip: Callable[[int, bytes], Awaitable[bytes]],
) -> PeerHandlers:
    """This host's answers on the peer port: the use cases of ``services`` for the members of
    ``cluster`` (by Raft id: a removed member is refused), gossip's packets to ``gossip``."""

    def is_member(raft_id: int) -> bool:
        member = cluster.members.get(raft_id)
        return member is not None and not member.removed

    async def metrics(run: str, job: int | None) -> dict[str, Any]:
        return await services.metrics.run(run, job, local=True)

    async def secrets(raft_id: int, job_id: str) -> dict[str, str]:
        member = cluster.members.get(raft_id)
        if member is None or services.access is None:
            raise Unavailable("no secrets here", "this member serves no secrets", "unavailable")
        return await services.access.resolve_for_job(member.node_id, job_id)

    async def history(run: str, job: int, since_s: float, points: int) -> dict[str, Any]:
        return await services.metrics.history_of(
            run, job, since_s=since_s, points=points, local=True
        )

    return PeerHandlers(
        is_member=is_member,
        secrets=secrets,
        gossip=gossip,
        code_path=services.code.path,
        code_put=services.code.put,
        code_limit=services.code.limit,
        logs=services.logs.here,
        metrics=metrics,
        admit=services.admission.admit_forwarded,
        history=history,
        backend_offers=services.backends.offers_forwarded if services.backends else None,
    )


class NoPeers:
    """``Peers`` of a host that calls no one (in-process tests, tools): every call is
    ``Unavailable``."""

    async def logs(self, node_id: str, run: str, job: int, follow: bool) -> AsyncIterator[bytes]:
        raise Unavailable("peer unavailable", f"no calls to node {node_id} here", "unavailable")
        yield b""  # an async generator, as the interface has it

    async def metrics(
        self, node_id: str, run: str, job: int | None, *, timeout: float
    ) -> dict[str, Any]:
        raise Unavailable("peer unavailable", f"no calls to node {node_id} here", "unavailable")

    async def join(self, node_id: str, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        raise Unavailable("peer unavailable", f"no calls to node {node_id} here", "unavailable")

    async def history(
        self, node_id: str, run: str, job: int, since_s: float, points: int, *, timeout: float
    ) -> dict[str, Any]:
        raise Unavailable("peer unavailable", f"no calls to node {node_id} here", "unavailable")

    async def backend_offers(
        self, node_id: str, body: dict[str, Any], *, timeout: float
    ) -> dict[str, Any]:
        raise Unavailable("peer unavailable", f"no calls to node {node_id} here", "unavailable")
