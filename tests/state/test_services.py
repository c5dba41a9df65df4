"""Services in the state machine: replica groups, scaling (clip, reuse of replica numbers, scale to
zero), readiness reports fenced by epoch, in-place updates and dstack's surge-by-one rolling
deployment. Pure: commands in, state out."""

from __future__ import annotations

import json
from typing import Any

from meshgpu.config import parse_config
from meshgpu.config.render import to_json
from meshgpu.state import (
    CodeRef,
    JobFinished,
    JobRecord,
    JobStatus,
    JobTerminationReason,
    ProbeReport,
    RegisterNode,
    ReplicaProbes,
    RunStatus,
    ScaleService,
    StateMachine,
    StopRun,
    UpdateService,
)
from meshgpu.testing import host
from tests.state.test_state import apply, schedule, start_all, submit

WEB = "type: service\nport: 8000\ncommands: [serve]\nresources:\n  gpu: 1\n"
SCALED = WEB + "replicas: 0..4\nscaling:\n  metric: rps\n  target: 10\n"


def node(node_id: str, ip: str) -> RegisterNode:
    return host(node_id, 8).model_copy(update={"internal_ip": ip})


def mesh(*ips: str) -> StateMachine:
    sm = StateMachine()
    apply(sm, *(node(f"n{i}", ip) for i, ip in enumerate(ips, 1)))
    return sm


def live(sm: StateMachine, run: str = "web") -> list[JobRecord]:
    return [j for j in sm.run_jobs(sm.runs[run]) if not j.status.is_finished()]


def replicas(sm: StateMachine, run: str = "web") -> list[int]:
    return sorted(j.replica_num for j in live(sm, run))


def scale(sm: StateMachine, n: int, at: float = 5.0, group: str = "0") -> Any:
    return apply(sm, ScaleService(at=at, run_name="web", group=group, replicas=n))[0]


def ready(sm: StateMachine, *nums: int, value: bool = True, at: float = 6.0) -> Any:
    jobs = [j for j in live(sm) if j.replica_num in nums and j.status is JobStatus.RUNNING]
    reports = [
        ProbeReport(
            job_id=j.job_id, epoch=j.epoch, ready=value, probes=["ready" if value else "probing"]
        )
        for j in jobs
    ]
    return apply(sm, ReplicaProbes(at=at, reports=reports))[0]


def end_stopping(sm: StateMachine, at: float = 8.0) -> None:
    """The hosts report the end of every job asked to stop (SIGTERM: exit 143)."""
    for j in list(sm.active.values()):
        if j.status is JobStatus.TERMINATING:
            apply(
                sm,
                JobFinished(
                    at=at,
                    job_id=j.job_id,
                    epoch=j.epoch,
                    reason=JobTerminationReason.CONTAINER_EXITED_WITH_ERROR,
                    exit_code=143,
                ),
            )


def up(sm: StateMachine, at: float = 4.0) -> None:
    schedule(sm, at)
    start_all(sm, at)


def update(sm: StateMachine, yaml_text: str, at: float = 7.0, **more: Any) -> Any:
    config = to_json(parse_config(yaml_text))
    return apply(sm, UpdateService(at=at, run_name="web", config=config, **more))[0]


# -- submission and scaling -----------------------------------------------------------------------
def test_a_service_starts_at_min_and_a_scaled_to_zero_one_is_running() -> None:
    sm = mesh("10.0.0.1")
    apply(sm, submit("web", SCALED, at=2.0))
    run = sm.runs["web"]
    assert run.job_ids == [] and run.status is RunStatus.RUNNING
    assert run.desired_replicas == {"0": 0} and run.last_scaled_at == {"0": 2.0}
    fixed = mesh("10.0.0.1")
    apply(fixed, submit("web", WEB + "replicas: 2\n"))
    jobs = live(fixed)
    assert [(j.replica_num, j.job_num, j.group, j.deployment_num) for j in jobs] == [
        (0, 0, None, 0),
        (1, 0, None, 0),
    ]
    assert fixed.runs["web"].status is RunStatus.SUBMITTED


def test_scale_clips_stops_the_least_important_and_reuses_free_replica_numbers() -> None:
    sm = mesh("10.0.0.1", "10.0.0.2", "10.0.0.3")
    apply(sm, submit("web", SCALED))
    res = scale(sm, 9)
    assert res.ok and res.value == {"group": "0", "replicas": 4, "changed": True}
    assert replicas(sm) == [0, 1, 2, 3] and sm.runs["web"].last_scaled_at == {"0": 5.0}
    up(sm)  # three hosts, one port 8000 each: the fourth replica waits
    (waiting,) = [j for j in live(sm) if j.status is JobStatus.SUBMITTED]
    assert waiting.why_pending.startswith("port 8000 is in use on 10.0.0.")
    assert waiting.why_pending.endswith("by run web")
    ready(sm, 0, 1)
    # The same count again: nothing changes, not even when it was last scaled.
    assert scale(sm, 4, at=5.5).value["changed"] is False
    assert sm.runs["web"].last_scaled_at == {"0": 5.0}
    # Down to 2: the waiting replica (3) first, then the one not ready (2).
    assert scale(sm, 2, at=6.0).ok
    assert [j.replica_num for j in live(sm) if j.status is JobStatus.RUNNING] == [0, 1]
    stopping = [j for j in live(sm) if j.status is JobStatus.TERMINATING]
    assert [(j.replica_num, j.stop_requested) for j in stopping] == [(2, "scale")]
    gone = [sm.jobs[i] for i in sm.runs["web"].job_ids if sm.jobs[i].replica_num == 3]
    assert gone[0].termination_reason is JobTerminationReason.SCALED_DOWN
    end_stopping(sm)
    (two,) = [sm.jobs[i] for i in sm.runs["web"].job_ids if sm.jobs[i].replica_num == 2]
    assert two.termination_reason is JobTerminationReason.SCALED_DOWN
    run = sm.runs["web"]
    assert run.status is RunStatus.RUNNING and run.termination_reason is None
    # Up to 3: the lowest free number (2) again, as its next submission.
    scale(sm, 3, at=9.0)
    new = [j for j in live(sm) if j.status is JobStatus.SUBMITTED]
    assert [(j.replica_num, j.submission_num) for j in new] == [(2, 1)]
    assert two.job_id in run.replaced_job_ids
    assert len(set(run.job_ids)) == len(run.job_ids)


def test_scale_to_zero_and_back_stays_running_and_a_stop_ends_it_at_once() -> None:
    sm = mesh("10.0.0.1")
    apply(sm, submit("web", SCALED))
    scale(sm, 1)
    up(sm)
    assert sm.runs["web"].status is RunStatus.RUNNING
    scale(sm, 0, at=6.0)
    end_stopping(sm)
    assert live(sm) == [] and sm.runs["web"].status is RunStatus.RUNNING
    scale(sm, 1, at=9.0)
    assert replicas(sm) == [0] and sm.runs["web"].status is RunStatus.RUNNING
    scale(sm, 0, at=10.0)  # waiting: ends at once
    apply(sm, StopRun(at=11.0, run_name="web"))
    assert sm.runs["web"].status is RunStatus.TERMINATED


def test_scale_refuses_unknown_runs_groups_and_non_services() -> None:
    sm = mesh("10.0.0.1")
    apply(sm, submit("web", SCALED), submit("job", "type: task\ncommands: [x]\n"))
    assert scale(sm, 1, group="9").code == "not_found"
    res = apply(sm, ScaleService(at=3.0, run_name="job", replicas=1))[0]
    assert res.code == "not_a_service"
    assert apply(sm, ScaleService(at=3.0, run_name="nope", replicas=1))[0].code == "not_found"


def test_replica_groups_scale_apart_with_their_own_resources_and_commands() -> None:
    sm = mesh("10.0.0.1")
    yaml_text = (
        "type: service\nport: 8000\n"
        "replicas:\n"
        "  - name: big\n    count: 1\n    commands: [big]\n    resources:\n      gpu: 2\n"
        "  - name: small\n    count: 0..3\n    commands: [small]\n"
        "    scaling:\n      metric: rps\n      target: 5\n    resources:\n      gpu: 1\n"
    )
    apply(sm, submit("web", yaml_text))
    run = sm.runs["web"]
    assert run.desired_replicas == {"big": 1, "small": 0}
    scale(sm, 2, group="small")
    jobs = live(sm)
    assert [(j.replica_num, j.group) for j in jobs] == [(0, "big"), (1, "small"), (2, "small")]
    assert run.spec.job_spec("small").commands == ("small",)
    assert jobs[1].resources_key == run.spec.job_spec("small").resources_key


# -- readiness ---------------------------------------------------------------------------------
def test_readiness_is_fenced_by_epoch_and_only_counts_for_running_jobs() -> None:
    sm = mesh("10.0.0.1")
    apply(sm, submit("web", WEB))
    schedule(sm)
    (job,) = live(sm)
    early = ProbeReport(job_id=job.job_id, epoch=job.epoch, ready=True)
    assert apply(sm, ReplicaProbes(at=4.0, reports=[early]))[0].value == [
        {"ok": False, "code": "not_running"}
    ]
    start_all(sm)
    version = sm.service_version
    stale = ProbeReport(job_id=job.job_id, epoch=job.epoch - 1, ready=True)
    fresh = ProbeReport(job_id=job.job_id, epoch=job.epoch, ready=True, probes=["ready"])
    res = apply(sm, ReplicaProbes(at=5.0, reports=[stale, fresh]))[0]
    assert [r["code"] for r in res.value] == ["stale", ""]
    assert job.ready and job.probes == ["ready"] and sm.service_version > version
    version = sm.service_version
    apply(sm, ReplicaProbes(at=5.5, reports=[fresh]))  # no change: no bump
    assert sm.service_version == version


# -- in-place updates and rolling deployments ----------------------------------------------------
def test_a_replicas_only_update_applies_without_redeploying() -> None:
    sm = mesh("10.0.0.1", "10.0.0.2", "10.0.0.3")
    apply(sm, submit("web", WEB + "replicas: 2\n"))
    up(sm)
    ready(sm, 0, 1)
    res = update(sm, WEB + "replicas: 3\npriority: 4\n")
    assert res.ok and res.value["redeploy"] is False
    assert set(res.value["changed"]) == {"replicas", "priority"}
    run = sm.runs["web"]
    assert run.deployment_num == 0 and run.priority == 4 and run.desired_replicas == {"0": 3}
    assert replicas(sm) == [0, 1, 2] and all(j.deployment_num == 0 for j in live(sm))
    assert not any(j.status is JobStatus.TERMINATING for j in live(sm))


def test_a_rolling_update_surges_by_one_and_keeps_old_replicas_serving() -> None:
    sm = mesh("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4")
    apply(sm, submit("web", WEB + "replicas: 2\n"))
    up(sm)
    ready(sm, 0, 1)
    res = update(sm, WEB.replace("[serve]", "[serve2]") + "replicas: 2\n")
    assert res.ok and res.value["redeploy"] is True and res.value["changed"] == ["commands"]
    run = sm.runs["web"]
    assert run.deployment_num == 1 and run.status is RunStatus.RUNNING
    # One new replica above desired; both old ones keep serving.
    new = [j for j in live(sm) if j.deployment_num == 1]
    assert [j.replica_num for j in new] == [2]
    assert sum(j.status is JobStatus.RUNNING and j.ready for j in live(sm)) == 2
    up(sm, at=8.0)
    # The new replica runs but never becomes ready: nothing more happens, the old ones serve.
    ready(sm, 2, value=False, at=9.0)
    assert [j.replica_num for j in live(sm) if j.status is JobStatus.TERMINATING] == []
    assert run.status is RunStatus.RUNNING
    # It becomes ready: one old replica (the highest number) drains, another new one is queued.
    ready(sm, 2, at=10.0)
    stopping = [j for j in live(sm) if j.status is JobStatus.TERMINATING]
    assert [(j.replica_num, j.deployment_num) for j in stopping] == [(1, 0)]
    waiting = [j for j in live(sm) if j.status is JobStatus.SUBMITTED]
    assert [j.deployment_num for j in waiting] == [1]
    assert waiting[0].replica_num == 3  # 1 is still stopping: not free yet
    end_stopping(sm, at=11.0)
    up(sm, at=12.0)
    ready(sm, 3, at=13.0)
    end_stopping(sm, at=14.0)
    assert sorted((j.replica_num, j.deployment_num) for j in live(sm)) == [(2, 1), (3, 1)]
    assert all(j.ready for j in live(sm)) and run.status is RunStatus.RUNNING
    ended = [
        sm.jobs[i] for i in [*run.job_ids, *run.replaced_job_ids] if sm.jobs[i].deployment_num == 0
    ]
    assert {j.termination_reason for j in ended} == {JobTerminationReason.SCALED_DOWN}
    assert run.termination_reason is None


def test_a_rollout_stops_old_replicas_that_receive_no_traffic_at_once() -> None:
    sm = mesh("10.0.0.1", "10.0.0.2", "10.0.0.3")
    apply(sm, submit("web", WEB + "replicas: 2\n"))
    up(sm)  # running, never ready
    code = CodeRef(sha256="a" * 64, size=1, node_id="n1")
    res = update(sm, WEB + "replicas: 2\n", code=code)  # only the archive changed
    assert res.value["redeploy"] is True and res.value["changed"] == ["code"]
    old = [j for j in live(sm) if j.deployment_num == 0]
    assert {j.status for j in old} == {JobStatus.TERMINATING}
    new = [j for j in live(sm) if j.deployment_num == 1]
    assert len(new) == 2 and sm.runs["web"].code == code
    # Old ones finishing free their numbers for nothing more: the group is at desired.
    end_stopping(sm)
    assert len(live(sm)) == 2 and sm.runs["web"].status is RunStatus.RUNNING


def test_an_update_of_an_unchanged_service_changes_nothing() -> None:
    sm = mesh("10.0.0.1")
    apply(sm, submit("web", WEB))
    res = update(sm, WEB)
    assert res.value == {"redeploy": False, "changed": [], "deployment_num": 0}
    assert update(sm, "type: task\ncommands: [x]\n").code == "not_a_service"


# -- snapshots -----------------------------------------------------------------------------------
def test_service_fields_survive_a_snapshot_and_defaults_are_left_out() -> None:
    sm = mesh("10.0.0.1", "10.0.0.2")
    apply(sm, submit("web", WEB + "replicas: 1\n"), submit("t", "type: task\ncommands: [x]\n"))
    up(sm)
    ready(sm, 0)
    update(sm, WEB.replace("[serve]", "[v2]") + "replicas: 1\n")
    doc = json.loads(sm.snapshot())
    runs = {r["run_name"]: r for r in doc["runs"]}
    assert "deployment_num" not in runs["t"] and "desired_replicas" not in runs["t"]
    assert runs["web"]["deployment_num"] == 1 and runs["web"]["desired_replicas"] == {"0": 1}
    jobs = {j["job_id"]: j for j in doc["jobs"]}
    (task_job,) = [j for j in jobs.values() if j["run_name"] == "t"]
    assert not {"ready", "probes", "deployment_num"} & set(task_job)
    back = StateMachine()
    back.restore(sm.snapshot())
    assert back.snapshot() == sm.snapshot()
    for job_id, job in sm.jobs.items():
        assert back.jobs[job_id] == job
    assert back.runs["web"].last_scaled_at == sm.runs["web"].last_scaled_at


def test_a_replica_lost_with_its_host_is_replaced_without_retry() -> None:
    """A service keeps its replicas through interruptions even without ``retry``; its own error
    exits still follow ``retry`` (none here: the run fails)."""
    sm = mesh("10.0.0.1", "10.0.0.2")
    apply(sm, submit("web", WEB + "replicas: 2\n"))
    schedule(sm)
    start_all(sm)
    lost = next(j for j in live(sm) if j.node_id == "n1")
    sm.fail_node_jobs("n1", JobTerminationReason.INSTANCE_UNREACHABLE, 9.0)
    assert sm.runs["web"].status is RunStatus.RUNNING
    again = [j for j in live(sm) if j.replica_num == lost.replica_num]
    assert len(again) == 1 and again[0].submission_num == 1, again
    assert again[0].status is JobStatus.SUBMITTED
    # an error exit of a replica fails a service without retry, as in dstack
    other = next(j for j in live(sm) if j.status is JobStatus.RUNNING)
    apply(
        sm,
        JobFinished(
            at=10.0,
            job_id=other.job_id,
            epoch=other.epoch,
            reason=JobTerminationReason.CONTAINER_EXITED_WITH_ERROR,
            exit_code=1,
        ),
    )
    assert sm.runs["web"].termination_reason is not None
