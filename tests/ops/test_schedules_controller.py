"""The leader's schedule controller under a fake clock (trio's MockClock, autojump; wall time
moves with it): a scheduled run starts at its cron time, goes back to waiting after it finished
and starts again at the next one; two leaders proposing at once start it once; a leader that
takes over after a missed start starts the run once, late, and none of the missed ones again."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
import trio.testing

from meshgpu.clock import FakeClock
from meshgpu.config.cron import next_start
from meshgpu.control import Schedules
from meshgpu.control.terms import leader_controllers
from meshgpu.state import (
    JobFinished,
    JobStatus,
    JobTerminationReason,
    RunStatus,
    ScheduleRun,
    StateMachine,
    TriggerRun,
    decode,
)
from meshgpu.state.cluster import Replicated
from tests.api._stub import Proposer
from tests.scheduler._world import host, schedule, submit, task, world

CRON = "*/5 * * * *"
EPOCH = datetime(2024, 1, 3, 12, 0, 30, tzinfo=UTC).timestamp()  # wall time at mock time 0


def at(minutes: float) -> float:
    """Mock time ``minutes`` after 12:00:00 UTC."""
    return minutes * 60 - 30


def scheduled_world() -> tuple[StateMachine, Proposer]:
    cmd = submit("nightly", task("H100:1", schedule={"cron": [CRON]}), at=EPOCH)
    cmd = cmd.model_copy(update={"next_triggered_at": next_start([CRON], EPOCH)})
    sm = world(host("n1", 8), cmd)
    replicated = Replicated()
    replicated.jobs = sm
    return sm, Proposer(replicated)


def kinds(proposer: Proposer) -> list[str]:
    return [decode(c).kind for c in proposer.proposed]


def run_to_the_end(sm: StateMachine, clock: FakeClock) -> None:
    """The job is placed, runs, and ends (as its host would report it)."""
    schedule(sm, now=clock.wall())
    for job in sm.run_jobs(sm.runs["nightly"]):
        if job.status is JobStatus.RUNNING:
            sm.apply_command(
                JobFinished(
                    at=clock.wall(),
                    job_id=job.job_id,
                    epoch=job.epoch,
                    reason=JobTerminationReason.DONE_BY_RUNNER,
                    exit_code=0,
                )
            )


async def test_it_starts_on_schedule_and_again_after_each_cycle(
    autojump_clock: trio.abc.Clock,
) -> None:
    sm, proposer = scheduled_world()
    clock = FakeClock(EPOCH)
    run = sm.runs["nightly"]
    assert run.next_triggered_at == EPOCH + at(5) and run.status is RunStatus.PENDING
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Schedules(sm, proposer, clock=clock).run)
        await trio.sleep_until(at(5) - 0.5)
        assert proposer.proposed == [] and run.job_ids == []  # not before its time
        await trio.sleep_until(at(5) + 1.5)
        assert kinds(proposer) == ["trigger_run"]
        assert run.last_triggered_at == EPOCH + at(5) and run.status is RunStatus.SUBMITTED
        await trio.sleep_until(at(6.5))  # it runs for a minute and a half
        run_to_the_end(sm, clock)
        assert run.status is RunStatus.PENDING and run.waiting_since == EPOCH + at(6.5)
        await trio.sleep(1.5)
        assert kinds(proposer) == ["trigger_run", "schedule_run"]
        assert run.next_triggered_at == EPOCH + at(10)
        await trio.sleep_until(at(10) + 1.5)
        assert kinds(proposer) == ["trigger_run", "schedule_run", "trigger_run"]
        [job] = sm.run_jobs(run)
        assert job.submission_num == 1 and job.status is JobStatus.SUBMITTED
        await trio.sleep_until(at(14))
        assert len(proposer.proposed) == 3  # running: nothing more until it finishes
        nursery.cancel_scope.cancel()


async def test_two_leaders_at_once_start_it_once(autojump_clock: trio.abc.Clock) -> None:
    sm, proposer = scheduled_world()
    clock = FakeClock(EPOCH)
    other = Proposer(proposer.replicated)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Schedules(sm, proposer, clock=clock).run)
        nursery.start_soon(Schedules(sm, other, clock=clock, interval_s=0.7).run)
        await trio.sleep_until(at(5) + 3)
        nursery.cancel_scope.cancel()
    run = sm.runs["nightly"]
    assert len(run.job_ids) == 1 and run.replaced_job_ids == []
    assert run.last_triggered_at == EPOCH + at(5)


async def test_a_leader_that_takes_over_late_starts_the_missed_start_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    sm, proposer = scheduled_world()
    clock = FakeClock(EPOCH)
    await trio.sleep_until(at(17))  # no leader from 12:00:30 to 12:17 (starts at :05, :10, :15)
    # The old leader's proposal of the 12:05 start, committed late: still applies once.
    fired = EPOCH + at(5)
    first = sm.apply_command(TriggerRun(at=clock.wall(), run_name="nightly", triggered_at=fired))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Schedules(sm, proposer, clock=clock).run)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert first.ok and proposer.proposed == []  # the new leader found it started: nothing to do
    assert len(sm.runs["nightly"].job_ids) == 1

    sm, proposer = scheduled_world()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Schedules(sm, proposer, clock=clock).run)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert kinds(proposer) == ["trigger_run"]  # once, late: not once per missed time
    assert decode(proposer.proposed[0]).triggered_at == EPOCH + at(5)


async def test_every_leader_arms_a_finished_cycle_for_the_same_start(
    autojump_clock: trio.abc.Clock,
) -> None:
    sm, proposer = scheduled_world()
    clock = FakeClock(EPOCH)
    sm.apply_command(TriggerRun(at=EPOCH + at(5), run_name="nightly", triggered_at=EPOCH + at(5)))
    await trio.sleep_until(at(6))
    run_to_the_end(sm, clock)
    await trio.sleep_until(at(12))  # leaders come and go; the cycle ended at 12:06
    one = Schedules(sm, proposer, clock=clock).due(clock.wall())
    two = Schedules(sm, proposer, clock=clock).due(clock.wall() + 30)
    assert [type(c) for c in one] == [type(c) for c in two] == [ScheduleRun]
    assert one[0].next_triggered_at == two[0].next_triggered_at == EPOCH + at(10)


def test_the_leader_runs_the_schedule_controller() -> None:
    names = [
        name
        for name, _ in leader_controllers(
            None, StateMachine(), None, None, None, None, dict, "n1", dict, _Settings(), FakeClock()
        )  # type: ignore[arg-type]
    ]
    assert "schedules" in names


class _Settings:
    keep_runs = 10
    keep_runs_for_s = 60.0
    retention_interval_s = 10.0


async def test_a_submission_carries_its_first_start_and_ps_shows_it(tmp_path: Path) -> None:
    from meshgpu.api.views import run_view
    from meshgpu.cli._runs import next_start_text
    from tests.ops.test_runs import Body, _runs

    runs, sm, _ = _runs(tmp_path)
    text = "type: task\ncommands: [echo hi]\nschedule:\n  cron: ['0 9 * * 0', '30 7 * * sat']\n"
    before = time.time()
    run, _ = await runs.submit(Body(config=text, name="weekly"))
    assert run.status is RunStatus.PENDING and run.job_ids == []
    assert run.next_triggered_at == next_start(["0 9 * * 0", "30 7 * * sat"], run.submitted_at)
    assert run.submitted_at >= before
    start = datetime.fromtimestamp(run.next_triggered_at, UTC)
    assert (start.strftime("%A"), start.hour) in (("Monday", 9), ("Saturday", 7))
    view = run_view(run, sm)
    assert view["next_triggered_at"] == run.next_triggered_at
    assert next_start_text(view["next_triggered_at"]).startswith(
        f"next start {start:%Y-%m-%d %H:%M} UTC (in "
    )
    assert next_start_text(None) == "waiting for its schedule"


@pytest.mark.parametrize(
    ("auth", "code"),
    [
        ("{username: me, password: '${{ secrets.TOKEN }}'}", "no_secrets"),
        ("{username: '${{ env.USER }}', password: x}", "unresolved_reference"),
    ],
)
async def test_references_in_registry_auth_are_refused(
    tmp_path: Path, auth: str, code: str
) -> None:
    from meshgpu import errors
    from tests.ops.test_runs import Body, _runs, host

    runs, sm, proposer = _runs(tmp_path)
    sm.apply_command(host("n2", 0, runtime="/usr/bin/docker"))  # image jobs can run here
    text = f"type: task\nimage: ghcr.io/me/x\ncommands: [a]\nregistry_auth: {auth}\n"
    with pytest.raises(errors.Invalid) as info:
        await runs.submit(Body(config=text))
    assert info.value.code == code
    # A node without a secret store says so; otherwise the reference is resolved at job start.
    assert ("secret store" if code == "no_secrets" else "registry_auth.") in info.value.detail
    assert proposer.proposed == []
