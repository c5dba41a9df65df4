"""Following the log of a job that ended without ever starting here must end, not wait forever
(an attached ``apply`` hung on a job whose start failed before it had a log)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import httpx
import trio

from meshgpu.ops import Logs
from meshgpu.runner.process import ProcessRunner
from meshgpu.state import JobRecord, JobStatus, JobTerminationReason


def _logs(tmp_path: Path, job: JobRecord) -> Logs:
    state: Any = types.SimpleNamespace(jobs={job.job_id: job})
    runner = ProcessRunner(tmp_path / "jobs", use_launcher=False)
    return Logs(state, runner, "n1", httpx.AsyncClient, poll_s=0.01)


def _job(status: JobStatus) -> JobRecord:
    return JobRecord(
        job_id="r-0-0-0",
        run_name="r",
        run_id="r",
        status=status,
        node_id="n1",
        termination_reason=JobTerminationReason.EXECUTOR_ERROR if status.is_finished() else None,
    )


async def test_follow_ends_for_a_job_that_failed_before_it_started(tmp_path: Path) -> None:
    logs = _logs(tmp_path, _job(JobStatus.FAILED))
    with trio.fail_after(5):
        chunks = [c async for c in logs.stream_local("r-0-0-0", follow=True)]
    assert chunks == []


async def test_follow_waits_while_the_job_runs(tmp_path: Path) -> None:
    job = _job(JobStatus.RUNNING)
    logs = _logs(tmp_path, job)
    d = logs.runner.job_dir(job.job_id)
    d.mkdir(parents=True)
    (d / "job.json").write_text("{}")
    (d / "output.log").write_bytes(b"hello\n")
    got: list[bytes] = []

    async def follow() -> None:
        async for c in logs.stream_local(job.job_id, follow=True):
            got.append(c)

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(follow)
            while not got:
                await trio.sleep(0.01)
            assert n.child_tasks, "the stream must still be open while the job runs"
            (d / "status.json").write_text('{"exit_code": 0, "reason": "done_by_runner"}')
            job.status = JobStatus.DONE
    assert got == [b"hello\n"]
