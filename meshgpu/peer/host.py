"""What this host answers on the peer port, built from the parts that hold the answers (the
replicated state, the code store, the job logs): ``host_handlers`` gives the ``PeerHandlers``
a ``PeerServer`` runs. Nothing here knows about HTTP or the agent."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from meshgpu.runner.code import CodeStore
from meshgpu.state import StateMachine
from meshgpu.state.cluster import ClusterState

from .server import PeerHandlers
from .wire import PeerError


def host_handlers(
    *,
    cluster: ClusterState,
    state: StateMachine,
    code: CodeStore,
    code_put: Callable[[bytes, str], Awaitable[Any]],
    stream_logs: Callable[[str, bool], AsyncIterator[bytes]],
    metrics: Callable[[str, int | None], Awaitable[dict[str, Any]]],
    admit: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    is_leader: Callable[[], bool],
    gossip: Callable[[int, bytes], Awaitable[bytes]],
) -> PeerHandlers:
    def is_member(raft_id: int) -> bool:
        member = cluster.members.get(raft_id)
        return member is not None and not member.removed

    def code_path(sha: str) -> Path | None:
        return code.path(sha) if code.has(sha) else None

    async def logs(run: str, job: int, follow: bool) -> AsyncIterator[bytes]:
        record = state.runs.get(run)
        if record is None:
            raise PeerError(404, "run not found", f"no run named {run!r}", "not_found")
        jobs = state.run_jobs(record)
        if not 0 <= job < len(jobs):
            raise PeerError(404, "job not found", f"run {run!r} has jobs 0..{len(jobs) - 1}")
        async for chunk in stream_logs(jobs[job].job_id, follow):
            yield chunk

    async def admit_here(body: dict[str, Any]) -> dict[str, Any]:
        # Forwarded joins are answered by the leader only: a member that lost the leadership
        # meanwhile says so (the joiner retries) rather than forwarding again.
        if not is_leader():
            raise PeerError(503, "not the leader", "retry in a few seconds", "unavailable")
        return await admit(body)

    return PeerHandlers(
        is_member=is_member,
        gossip=gossip,
        code_path=code_path,
        code_put=code_put,
        code_limit=code.limit,
        logs=logs,
        metrics=metrics,
        admit=admit_here,
    )
