"""A job's output: streamed from this host's job directory, or through from the host that ran
the job (over the peer port: ``Peers.logs``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from meshgpu.errors import MeshError, job_not_found, run_not_found

if TYPE_CHECKING:
    from meshgpu.ops.peers import Peers
    from meshgpu.runner import ProcessRunner
    from meshgpu.state import JobRecord, StateMachine


@dataclass(frozen=True, slots=True)
class LogSource:
    """Where a job's log is read: here (``node_id`` None) or at the host that ran it."""

    job: JobRecord
    node_id: str | None


class Logs:
    def __init__(
        self,
        state: StateMachine,
        runner: ProcessRunner,
        node_id: str,
        peers: Peers,
        poll_s: float = 0.1,
    ) -> None:
        self.state, self.runner, self.node_id = state, runner, node_id
        self.peers = peers  # other members, over the peer port
        self.poll_s = poll_s  # how often a followed log is read again for more

    def source(self, name: str, job: int) -> LogSource:
        run = self.state.runs.get(name)
        if run is None:
            raise run_not_found(name)
        jobs = self.state.run_jobs(run)
        if not 0 <= job < len(jobs):
            raise job_not_found(name, len(jobs))
        target = jobs[job]
        owner = self.state.nodes.get(target.node_id) if target.node_id else None
        if owner is not None and target.node_id != self.node_id:
            return LogSource(target, owner.node_id)
        return LogSource(target, None)

    async def here(self, name: str, job: int, follow: bool) -> AsyncIterator[bytes]:
        """The job's log as this host has it, wherever the state says it runs (what another
        member asks for over the peer port: it never asks on in turn)."""
        target = self.source(name, job).job
        async for chunk in self.stream_local(target.job_id, follow):
            yield chunk

    async def stream_local(self, job_id: str, follow: bool) -> AsyncIterator[bytes]:
        path = self.runner.log_path(job_id)
        pos = 0
        while True:
            job = self.state.jobs.get(job_id)
            finished = job is None or job.status.is_finished()
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read(1 << 20)
                if chunk:
                    pos += len(chunk)
                    yield chunk
                    continue
            if not follow or (
                finished
                and (job is None or job.node_id != self.node_id or self._ended_on_disk(job_id))
            ):
                return
            await trio.sleep(self.poll_s)

    async def proxy(self, node_id: str, run: str, job: int, follow: bool) -> AsyncIterator[bytes]:
        """The log as the member ``node_id`` has it, over the peer port (the caller was
        authenticated here; members trust each other's certificates, not tokens). A broken
        stream ends with a line that says so: the response has begun, it cannot fail now."""
        try:
            async for chunk in self.peers.logs(node_id, run, job, follow):
                yield chunk
        except MeshError as e:
            owner = self.state.nodes.get(node_id)
            name = owner.name if owner is not None else node_id
            yield f"\n[meshgpu: the log stream from {name} broke: {e.title}: {e}]\n".encode()

    def _ended_on_disk(self, job_id: str) -> bool:
        """Nothing more will be written to the job's log here: its supervisor recorded the end,
        or the job never started on this host (it failed before launch: no record, no log)."""
        if self.runner.result(job_id) is not None:
            return True
        try:
            return not (self.runner.job_dir(job_id) / "job.json").exists()
        except ValueError:
            return True
