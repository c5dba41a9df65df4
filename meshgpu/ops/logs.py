"""A job's output: streamed from this host's job directory, or through from the host that ran
the job."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import trio

from meshgpu.errors import job_not_found, run_not_found

if TYPE_CHECKING:
    from meshgpu.runner import ProcessRunner
    from meshgpu.state import JobRecord, StateMachine


@dataclass(frozen=True, slots=True)
class LogSource:
    """Where a job's log is read: here (``api_url`` None) or at the host that ran it."""

    job: JobRecord
    api_url: str | None


class Logs:
    def __init__(
        self,
        state: StateMachine,
        runner: ProcessRunner,
        node_id: str,
        http_client: Callable[..., httpx.AsyncClient],
        poll_s: float = 0.1,
    ) -> None:
        self.state, self.runner, self.node_id = state, runner, node_id
        self.http_client = http_client  # for other members' APIs (the cluster CA)
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
        if owner is not None and target.node_id != self.node_id and owner.api_url:
            return LogSource(target, owner.api_url)
        return LogSource(target, None)

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

    async def proxy(
        self, api_url: str, run: str, job: int, follow: bool, auth: str
    ) -> AsyncIterator[bytes]:
        """The log as the host at ``api_url`` serves it (asked with the caller's ``auth``)."""
        params: dict[str, Any] = {"job": job, "follow": str(follow).lower()}
        async with self.http_client(timeout=httpx.Timeout(30, read=None)) as c:
            try:
                async with c.stream(
                    "GET",
                    f"{api_url}/api/v1/runs/{run}/logs",
                    params=params,
                    headers={"Authorization": auth},
                ) as r:
                    async for chunk in r.aiter_bytes():
                        yield chunk
            except httpx.TransportError as e:
                yield f"\n[meshgpu: the log stream from {api_url} broke: {e}]\n".encode()

    def _ended_on_disk(self, job_id: str) -> bool:
        """Nothing more will be written to the job's log here: its supervisor recorded the end,
        or the job never started on this host (it failed before launch: no record, no log)."""
        if self.runner.result(job_id) is not None:
            return True
        try:
            return not (self.runner.job_dir(job_id) / "job.json").exists()
        except ValueError:
            return True
