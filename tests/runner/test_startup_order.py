"""``startup_order``: the executor's launch gate, on its own and with two executors (two fake
hosts) sharing one replicated state and launching real processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from meshgpu.runner import ProcessRunner
from meshgpu.runner.executor import Executor, startup_waits_for
from meshgpu.scheduler import plan
from meshgpu.state import JobStarted, JobStatus, RunStatus, StateMachine, decode
from tests.scheduler._world import apply_plan, host, jobs, submit, task, world


def placed(order: str | None, nodes: int = 3, commands: list[str] | None = None) -> StateMachine:
    config = task("H100:8", nodes=nodes) | {"commands": commands or ["true"]}
    if order is not None:
        config["startup_order"] = order
    sm = world(*(host(f"n{i}") for i in range(nodes)), submit("d", config, at=0))
    apply_plan(sm, plan(sm, now=1), at=1, start=False)
    assert {j.status for j in jobs(sm, "d")} == {JobStatus.PROVISIONING}
    return sm


def start(sm: StateMachine, job: Any) -> None:
    sm.apply_command(JobStarted(at=2, job_id=job.job_id, epoch=job.epoch, started_at=2))


def test_the_gate() -> None:
    sm = placed(None)
    assert all(startup_waits_for(sm, j) is None for j in jobs(sm, "d"))
    sm = placed("any")
    assert all(startup_waits_for(sm, j) is None for j in jobs(sm, "d"))

    sm = placed("master-first")
    m, w1, w2 = jobs(sm, "d")
    assert startup_waits_for(sm, m) is None
    assert startup_waits_for(sm, w1) == "master-first: waiting for job(s) 0 to run"
    start(sm, m)
    assert startup_waits_for(sm, w1) is None and startup_waits_for(sm, w2) is None

    sm = placed("workers-first")
    m, w1, w2 = jobs(sm, "d")
    assert startup_waits_for(sm, w1) is None and startup_waits_for(sm, w2) is None
    assert startup_waits_for(sm, m) == "workers-first: waiting for job(s) 1, 2 to run"
    start(sm, w1)
    assert startup_waits_for(sm, m) == "workers-first: waiting for job(s) 2 to run"
    start(sm, w2)
    assert startup_waits_for(sm, m) is None


@pytest.mark.parametrize("order", ["master-first", "workers-first"])
async def test_two_hosts_start_in_order(order: str, tmp_path: Path) -> None:
    sm = placed(order, nodes=2)
    master, worker = jobs(sm, "d")
    first, second = (master, worker) if order == "master-first" else (worker, master)
    release = trio.Event()
    started: list[int] = []
    executors: list[Executor] = []

    async def propose(data: bytes, request_id: Any = None) -> Any:
        cmd = decode(data)
        if isinstance(cmd, JobStarted):
            if cmd.job_id == first.job_id:
                await release.wait()  # hold the first job's start: the other must not launch
            started.append(sm.jobs[cmd.job_id].job_num)
        result = sm.apply_command(cmd)
        for e in executors:
            e.notify()
        return result

    runners = [ProcessRunner(tmp_path / n, use_launcher=False) for n in ("n0", "n1")]
    for node_id, runner in zip(("n0", "n1"), runners, strict=True):
        executors.append(
            Executor(node_id, sm, runner, propose, tmp_path / "code", gpu_vendor=lambda: "nvidia")
        )
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for e in executors:
                    await nursery.start(e.run)
                    e.notify()
                first_dir = runners[int(first.node_id[1:])].job_dir(first.job_id)
                second_exec = executors[int(second.node_id[1:])]
                while not (first_dir / "job.json").exists():
                    await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked()
                # The first job runs (its start is held back), the second still waits its turn.
                assert second.job_id not in second_exec.local
                assert second.status is JobStatus.PROVISIONING
                release.set()
                while sm.runs["d"].status is not RunStatus.DONE:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    finally:
        for r in runners:
            await r.aclose()
    assert started == [first.job_num, second.job_num]


def test_a_master_that_started_and_ended_in_one_entry_releases_the_workers() -> None:
    """A short master's host batches its start and end into one entry: the workers' host never
    sees it RUNNING, and must not wait for that forever."""
    from meshgpu.scheduler import plan
    from meshgpu.state import JobFinished, JobReports, JobStarted, JobTerminationReason
    from tests.scheduler._world import apply_plan, host, jobs, submit, task, world

    config = task("H100:8", nodes=2) | {"commands": ["true"], "startup_order": "master-first"}
    sm = world(host("n0"), host("n1"), submit("d", config, at=0))
    apply_plan(sm, plan(sm, now=1), at=1, start=False)
    m, w = jobs(sm, "d")
    assert startup_waits_for(sm, w) is not None  # the master has not started yet
    done = JobTerminationReason.DONE_BY_RUNNER
    sm.apply_command(
        JobReports(
            at=3,
            reports=[
                JobStarted(at=2, job_id=m.job_id, epoch=m.epoch, started_at=2),
                JobFinished(at=3, job_id=m.job_id, epoch=m.epoch, reason=done, exit_code=0),
            ],
        )
    )
    assert startup_waits_for(sm, w) is None
