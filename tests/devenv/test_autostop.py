"""Auto-stop's rules under a fake clock: inactivity_duration from the SessionTracker,
dstack's utilization rule from GPU samples, the monitor deciding over a real state machine, and
the replicated side (JobActivity, in-place inactivity_duration, snapshots)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from meshgpu.clock import Clock, FakeClock
from meshgpu.config import parse_config
from meshgpu.config.render import to_json
from meshgpu.config.spec import RunSpec, UtilizationRule
from meshgpu.devenv.autostop import (
    INACTIVITY,
    UTILIZATION,
    GPUSamples,
    below_utilization,
    decide,
    idle_since,
)
from meshgpu.devenv.monitor import AutoStop
from meshgpu.devenv.sessions import SessionTracker
from meshgpu.gpu import GPUTelemetry
from meshgpu.ops.runs import Runs
from meshgpu.state import (
    ActivityReport,
    AssignJobs,
    Assignment,
    JobActivity,
    JobStarted,
    JobStatus,
    Result,
    SetInactivityDuration,
    StateMachine,
    SubmitRun,
    decode,
    encode,
)
from meshgpu.testing import host

T0 = 1_700_000_000.0


class WallClock(Clock):
    """A wall clock the test moves (the monitor's ``check`` only reads ``wall``)."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def wall(self) -> float:
        return self.t


def apply(state: StateMachine, cmd: Any) -> Result:
    return state.apply([(state.applied_index + 1, encode(cmd))])[0]


DEV = """\
type: dev-environment
name: {name}
ide: vscode
init: [echo hello]
resources: {{gpu: 1}}
"""


def dev_env(state: StateMachine, name: str, extra: str = "", at: float = T0) -> str:
    """A dev environment submitted, placed on n1 (GPU 0..) and started at ``at``."""
    config = to_json(parse_config(DEV.format(name=name) + extra))
    assert apply(
        state,
        SubmitRun(at=at, request_id=f"r-{name}", run_id=f"id-{name}", run_name=name, config=config),
    ).ok
    job = state.run_jobs(state.runs[name])[0]
    busy = {i for j in state.jobs_on_node("n1") for i in j.gpu_indices}
    gpu = min(set(range(8)) - busy)
    assert apply(
        state,
        AssignJobs(
            at=at, assignments=[Assignment(job_id=job.job_id, node_id="n1", gpu_indices=[gpu])]
        ),
    ).ok
    assert apply(
        state,
        JobStarted(at=at, job_id=job.job_id, epoch=job.epoch, started_at=at, working_dir="/w/x"),
    ).ok
    assert state.jobs[job.job_id].status is JobStatus.RUNNING
    return job.job_id


class FakeExecutor:
    def __init__(self) -> None:
        self.local: dict[str, int] = {}
        self.stops: list[tuple[str, str, str]] = []

    def autostop(self, job_id: str, reason: str, message: str = "") -> bool:
        if any(s[0] == job_id for s in self.stops):
            return False
        self.stops.append((job_id, reason, message))
        return True


def mesh() -> StateMachine:
    state = StateMachine()
    assert apply(state, host("n1")).ok
    return state


def monitor(state: StateMachine, clock: Clock, tracker: SessionTracker | None = None, **kw: Any):
    ex = FakeExecutor()
    for j in state.jobs_on_node("n1"):
        ex.local[j.job_id] = j.epoch

    async def propose(data: bytes, **_: Any) -> Result:
        return apply(state, decode(data))

    tracker = tracker or SessionTracker(clock)
    return AutoStop("n1", state, ex, tracker, propose, clock=clock, **kw), ex, tracker


# -- the pure rules ------------------------------------------------------------------------


def test_idle_since_prefers_this_agents_tracker() -> None:
    base = dict(started_at=100.0, monitor_started=50.0)
    # never had a session: idle since the start
    assert idle_since(**base, tracked_sessions=0, tracked_last_closed=None, tracked_ever=False,
                      replicated_inactive_since=None, replicated_sessions=0) == 100.0  # fmt: skip
    # a session open: not idle
    assert idle_since(**base, tracked_sessions=1, tracked_last_closed=None, tracked_ever=True,
                      replicated_inactive_since=None, replicated_sessions=0) is None  # fmt: skip
    # the last one closed at 130
    assert idle_since(**base, tracked_sessions=0, tracked_last_closed=130.0, tracked_ever=True,
                      replicated_inactive_since=None, replicated_sessions=0) == 130.0  # fmt: skip
    # a restarted agent: the replicated activity says the last one closed at 120
    assert idle_since(**base, tracked_sessions=0, tracked_last_closed=None, tracked_ever=False,
                      replicated_inactive_since=120.0, replicated_sessions=0) == 120.0  # fmt: skip
    # ... or that one was open when it went down: idle since this agent started
    assert idle_since(started_at=100.0, monitor_started=200.0, tracked_sessions=0,
                      tracked_last_closed=None, tracked_ever=False,
                      replicated_inactive_since=None, replicated_sessions=2) == 200.0  # fmt: skip


def test_inactivity_verdict_exactly_at_the_deadline() -> None:
    spec = RunSpec(type="dev-environment", inactivity_duration_s=30)
    kw: dict[str, Any] = dict(spec=spec, started_at=T0, gpus=[], samples=None)
    assert decide(now=T0 + 29.9, idle_from=T0, **kw) is None
    v = decide(now=T0 + 30, idle_from=T0, **kw)
    assert v is not None and v.reason == INACTIVITY == "inactivity_duration_exceeded"
    assert decide(now=T0 + 3600, idle_from=None, **kw) is None  # attached: never
    off = RunSpec(type="dev-environment", inactivity_duration_s=None)
    assert (
        decide(now=T0 + 3600, idle_from=T0, spec=off, started_at=T0, gpus=[], samples=None) is None
    )


def samples_of(rows: list[tuple[float, dict[int, float]]]) -> GPUSamples:
    s = GPUSamples()
    for t, u in rows:
        s.add(t, u)
    return s


def test_dstack_rule_any_single_gpu_below_for_the_whole_window() -> None:
    rows = [(T0 + t, {0: 0.0, 1: 95.0}) for t in range(0, 301, 10)]
    s = samples_of(rows)
    # GPU 0 idle the whole window: the job holding GPUs 0 and 1 stops (any one GPU suffices)
    assert (
        below_utilization(s.between(T0, T0 + 300), [0, 1], window_start=T0, min_utilization=10) == 0
    )
    # GPU 1 busy: a job holding only GPU 1 goes on
    assert (
        below_utilization(s.between(T0, T0 + 300), [1], window_start=T0, min_utilization=10) is None
    )
    # one sample at or above the floor anywhere in the window: not "all below"
    spiky = samples_of([*rows[:-1], (T0 + 300, {0: 10.0})])
    assert (
        below_utilization(spiky.between(T0, T0 + 300), [0], window_start=T0, min_utilization=10)
        is None
    )
    # too little data: the oldest sample more than a minute after the window's start
    late = samples_of([r for r in rows if r[0] >= T0 + 61])
    assert (
        below_utilization(late.between(T0, T0 + 300), [0], window_start=T0, min_utilization=10)
        is None
    )
    near = samples_of([r for r in rows if r[0] >= T0 + 60])
    assert (
        below_utilization(near.between(T0, T0 + 300), [0], window_start=T0, min_utilization=10) == 0
    )


def test_utilization_verdict_counts_only_samples_since_the_job_started() -> None:
    spec = RunSpec(utilization=UtilizationRule(min_gpu_utilization=10, time_window_s=300))
    s = samples_of([(T0 + t, {0: 0.0}) for t in range(0, 1000, 5)])
    # started 100 s before now: a 300 s window is not covered yet, whatever the host saw before
    assert (
        decide(spec=spec, now=T0 + 900, started_at=T0 + 800, idle_from=None, gpus=[0], samples=s)
        is None
    )
    v = decide(spec=spec, now=T0 + 900, started_at=T0 + 500, idle_from=None, gpus=[0], samples=s)
    assert v is not None and v.reason == UTILIZATION == "terminated_due_to_utilization_policy"
    assert "GPU 0 below 10%" in v.message
    # a job with no GPUs is never stopped by it
    assert (
        decide(spec=spec, now=T0 + 900, started_at=T0, idle_from=None, gpus=[], samples=s) is None
    )
    # the test knob: a window of 300 s scaled by 0.02 is 6 s (slack 1.2 s)
    short = samples_of([(T0 + t, {0: 0.0}) for t in range(0, 8)])
    v = decide(
        spec=spec,
        now=T0 + 7,
        started_at=T0,
        idle_from=None,
        gpus=[0],
        samples=short,
        window_scale=0.02,
    )
    assert v is not None and v.reason == UTILIZATION


def test_samples_are_kept_for_the_window_only() -> None:
    s = GPUSamples(keep_s=100)
    for t in range(0, 1000):
        s.add(T0 + t, {0: 1.0})
    assert len(s) == 101
    s.add(T0 + 500, {0: 1.0})  # a clock that stepped back does not reorder the series
    assert len(s) == 101


# -- the monitor over a real state machine --------------------------------------------------


def test_monitor_stops_an_unattended_dev_env_and_not_an_attached_one() -> None:
    state, clock = mesh(), WallClock()
    idle = dev_env(state, "idle", "inactivity_duration: 30s\n")
    used = dev_env(state, "used", "inactivity_duration: 30s\n")
    plain = dev_env(state, "plain")  # no inactivity_duration: never stopped for it
    mon, ex, tracker = monitor(state, clock)
    tracker.opened(used)
    clock.t = T0 + 10
    assert mon.check() == T0 + 30  # the next deadline: the idle one's
    assert ex.stops == []
    clock.t = T0 + 30
    mon.check()
    assert [(j, r) for j, r, _ in ex.stops] == [(idle, INACTIVITY)]
    assert "no SSH session for 30s" in ex.stops[0][2]
    clock.t = T0 + 3600
    mon.check()
    assert [j for j, _, _ in ex.stops] == [idle]  # the attached one, and the plain one, go on
    # the session ends: its 30 s count from then
    tracker.closed(used)  # SessionTracker reads its own clock: the same one
    assert mon.check() == T0 + 3630
    clock.t = T0 + 3630
    mon.check()
    assert [j for j, _, _ in ex.stops] == [idle, used]
    assert plain not in [j for j, _, _ in ex.stops]


def test_in_place_inactivity_duration_is_applied_at_the_next_check() -> None:
    state, clock = mesh(), WallClock()
    job = dev_env(state, "dev", "inactivity_duration: 1h\n")
    mon, ex, _ = monitor(state, clock)
    clock.t = T0 + 120
    assert mon.check() == T0 + 3600
    assert apply(state, SetInactivityDuration(at=T0, run_name="dev", inactivity_duration=60)).ok
    assert state.runs["dev"].config["inactivity_duration"] == 60
    mon.check()
    assert [(j, r) for j, r, _ in ex.stops] == [(job, INACTIVITY)]
    # off: never
    state2, clock2 = mesh(), WallClock()
    dev_env(state2, "dev", "inactivity_duration: 1m\n")
    apply(state2, SetInactivityDuration(at=T0, run_name="dev", inactivity_duration="off"))
    mon2, ex2, _ = monitor(state2, clock2)
    clock2.t = T0 + 86400
    assert mon2.check() is None and ex2.stops == []


def test_monitor_utilization_from_telemetry_samples() -> None:
    state, clock = mesh(), WallClock()
    policy = "utilization_policy: {min_gpu_utilization: 10, time_window: 5m}\n"
    low = dev_env(state, "low", policy)  # GPU 0
    high = dev_env(state, "high", policy)  # GPU 1
    mon, ex, _ = monitor(state, clock, window_scale=0.02)  # a 6 s window
    for t in range(0, 10):
        clock.t = T0 + t
        mon.record_telemetry(
            [
                GPUTelemetry(index=0, utilization_pct=0.0),
                GPUTelemetry(index=1, utilization_pct=90.0),
            ]
        )
        mon.check()
    assert [(j, r) for j, r, _ in ex.stops] == [(low, UTILIZATION)]
    assert high not in [j for j, _, _ in ex.stops]


async def test_activity_is_published_on_change_batched(autojump_clock: trio.abc.Clock) -> None:
    clock = FakeClock(epoch=T0)
    state = mesh()
    job = dev_env(state, "dev", "inactivity_duration: 30s\n")
    entries: list[Any] = []

    async def propose(data: bytes, **_: Any) -> Result:
        entries.append(decode(data))
        return apply(state, decode(data))

    ex = FakeExecutor()
    ex.local[job] = state.jobs[job].epoch
    tracker = SessionTracker(clock)
    mon = AutoStop("n1", state, ex, tracker, propose, clock=clock, publish_delay_s=0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mon.run)
        await trio.sleep(1)
        for _ in range(5):  # an IDE opens and closes channels in a burst: one entry
            tracker.opened(job)
        tracker.closed(job)
        await trio.sleep(1)
        assert len(entries) == 1 and isinstance(entries[0], JobActivity)
        assert state.jobs[job].sessions == 4 and state.jobs[job].inactive_since is None
        for _ in range(4):
            tracker.closed(job)
        await trio.sleep(1)
        assert state.jobs[job].sessions == 0
        closed_at = state.jobs[job].inactive_since
        assert closed_at is not None
        # idle from the close: stopped 30 s later, not 30 s after the start
        await trio.sleep(28)
        assert ex.stops == []
        await trio.sleep(5)
        assert [(j, r) for j, r, _ in ex.stops] == [(job, INACTIVITY)]
        nursery.cancel_scope.cancel()


# -- the replicated side -----------------------------------------------------------------


def test_job_activity_is_fenced_and_left_out_of_snapshots_when_unset() -> None:
    state = mesh()
    job = dev_env(state, "dev")
    doc = json.loads(state.snapshot())
    (jdoc,) = doc["jobs"]
    assert jdoc["working_dir"] == "/w/x"
    assert "sessions" not in jdoc and "inactive_since" not in jdoc
    epoch = state.jobs[job].epoch
    stale = ActivityReport(job_id=job, epoch=epoch + 1, sessions=1)
    r = apply(state, JobActivity(at=T0, reports=[stale]))
    assert r.value == [{"ok": False, "code": "stale"}] and state.jobs[job].sessions == 0
    fresh = ActivityReport(job_id=job, epoch=epoch, sessions=0, inactive_since=T0 + 5)
    assert apply(state, JobActivity(at=T0, reports=[fresh])).value == [{"ok": True, "code": ""}]
    restored = StateMachine()
    restored.restore(state.snapshot())
    assert restored.jobs[job].inactive_since == T0 + 5
    assert restored.jobs[job].working_dir == "/w/x"


def test_set_inactivity_duration_only_for_active_dev_environments() -> None:
    state = mesh()
    dev_env(state, "dev")
    config = to_json(parse_config("type: task\nname: t\ncommands: [x]\n"))
    apply(state, SubmitRun(at=T0, request_id="rt", run_id="t", run_name="t", config=config))
    r = apply(state, SetInactivityDuration(at=T0, run_name="t", inactivity_duration=5))
    assert not r.ok and r.code == "not_a_dev_environment"
    assert (
        apply(state, SetInactivityDuration(at=T0, run_name="nope", inactivity_duration=5)).code
        == "not_found"
    )
    assert (
        apply(state, SetInactivityDuration(at=T0, run_name="dev", inactivity_duration=90)).value
        == 90
    )


class _Body:
    def __init__(self, config: str, name: str) -> None:
        self.config, self.filename, self.name = config, "dev.yml", name
        self.run_args: list[str] = []
        self.code_sha256 = None
        self.request_id = "again"
        self.env: dict[str, str] = {}
        self.gpu = None
        self.in_place = True


class _Proposer:
    def __init__(self, state: StateMachine) -> None:
        self.state = state

    async def propose(self, data: bytes, request_id: bytes | None = None) -> Result:
        return apply(self.state, decode(data))


@pytest.mark.parametrize(
    ("new", "changed", "want"),
    [
        ("inactivity_duration: 2h\n", ["inactivity_duration"], 7200),
        ("inactivity_duration: 2h\npriority: 7\n", ["priority", "inactivity_duration"], 7200),
        ("inactivity_duration: off\n", ["inactivity_duration"], None),
    ],
)
async def test_reapply_changes_inactivity_duration_in_place(
    new: str, changed: list[str], want: int | None
) -> None:
    state = mesh()
    dev_env(state, "dev", "inactivity_duration: 30m\n")
    runs = Runs(state, _Proposer(state), None, "n1")  # type: ignore[arg-type]
    run, updated = await runs.submit(_Body(DEV.format(name="dev") + new, "dev"))
    assert sorted(updated or []) == sorted(changed)
    assert run.spec.inactivity_duration_s == want
    assert len(state.runs) == 1  # no second run


async def test_reapply_with_another_change_is_not_in_place() -> None:
    state = mesh()
    dev_env(state, "dev", "inactivity_duration: 30m\n")
    runs = Runs(state, _Proposer(state), None, "n1")  # type: ignore[arg-type]
    body = _Body(DEV.format(name="dev").replace("echo hello", "echo other"), "dev")
    with pytest.raises(Exception, match="is active"):
        await runs.submit(body)
