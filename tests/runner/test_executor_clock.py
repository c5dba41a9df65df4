"""The executor's timing under a fake clock (trio's MockClock, autojump): a job report that does
not commit is retried, backing off, until it does -- once (one request id) -- in milliseconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from meshgpu.clock import FakeClock
from meshgpu.runner import ProcessRunner
from meshgpu.runner.executor import RETRY_FIRST_S, RETRY_MAX_S, Executor
from meshgpu.state import JobFinished, JobReports, JobStarted, JobTerminationReason, StateMachine
from meshgpu.state.commands import decode


async def test_a_report_is_retried_with_backoff_until_it_commits(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    calls: list[tuple[float, bytes | None, Any]] = []

    async def propose(data: bytes, request_id: bytes | None = None) -> None:
        calls.append((trio.current_time(), request_id, decode(data)))
        if len(calls) < 8:
            raise RuntimeError("no leader")

    clock = FakeClock()
    runner = ProcessRunner(tmp_path / "jobs", use_launcher=False)
    ex = Executor("n1", StateMachine(), runner, propose, tmp_path, lambda: None, clock=clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ex._reporter)
        ex._enqueue(JobStarted(at=clock.wall(), job_id="j1", epoch=1, started_at=clock.wall()))
        ex._enqueue(
            JobFinished(
                at=clock.wall(),
                job_id="j1",
                epoch=1,
                reason=JobTerminationReason.DONE_BY_RUNNER,
                exit_code=0,
            )
        )
        started = trio.current_time()
        with trio.fail_after(60):
            while len(calls) < 8:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    await runner.aclose()
    gaps = [round(b[0] - a[0], 6) for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert gaps[0] == RETRY_FIRST_S and max(gaps) == RETRY_MAX_S
    assert len({rid for _, rid, _ in calls}) == 1  # one request id: it takes effect once
    assert calls[0][0] == started
    # Both reports in one entry, stamped with the fake wall clock.
    cmd = calls[-1][2]
    assert isinstance(cmd, JobReports) and [type(r) for r in cmd.reports] == [
        JobStarted,
        JobFinished,
    ]
    assert cmd.at == clock.epoch + started
