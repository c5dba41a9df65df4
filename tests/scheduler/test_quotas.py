"""Per-project GPU quotas (``max_gpus``) in the pure scheduler and in ``AssignJobs``' re-check."""

from __future__ import annotations

from meshgpu.scheduler import SchedulerPolicy, plan
from meshgpu.state import AssignJobs, Assignment, JobStatus
from meshgpu.state.access import CreateProject, SetProjectQuota
from meshgpu.state.cluster import Replicated, encode_cluster
from tests.scheduler._world import apply_plan, finish, host, jobs, submit, task, world

FULL = "project a uses 4 of its 4 GPUs (max_gpus): waiting for one of its jobs to end"


def placed(sm, run: str) -> bool:  # type: ignore[no-untyped-def]
    return all(j.status.holds_resources() for j in jobs(sm, run))


def why(sm, run: str) -> str:  # type: ignore[no-untyped-def]
    return jobs(sm, run)[0].why_pending


def test_a_project_at_its_quota_waits_and_others_still_run() -> None:
    cmds = [submit(f"a{i}", task("H100:1"), at=1 + i * 0.1, project="a") for i in range(6)]
    cmds += [submit(f"b{i}", task("H100:1"), at=2 + i * 0.1, project="b") for i in range(3)]
    for policy in (SchedulerPolicy(), SchedulerPolicy(fair_share=False)):
        sm = world(host("n1", 8), *cmds)
        p = plan(sm, now=3.0, policy=policy, quotas={"a": 4})
        apply_plan(sm, p)
        assert [placed(sm, f"a{i}") for i in range(6)] == [True] * 4 + [False] * 2
        assert all(placed(sm, f"b{i}") for i in range(3))  # quota-blocked a reserves nothing
        assert why(sm, "a4") == why(sm, "a5") == FULL
        assert not p.reservations and not p.preemptions
    # One of a's jobs ends: the next one starts, and a is at its quota again.
    finish(sm, "a0")
    apply_plan(sm, plan(sm, now=10.0, quotas={"a": 4}), at=10.0)
    assert placed(sm, "a4") and not placed(sm, "a5")
    assert why(sm, "a5") == FULL


def test_a_gang_bigger_than_the_quota_says_to_raise_it_and_blocks_no_one() -> None:
    sm = world(
        host("n1", 8),
        host("n2", 8),
        submit("big", task("H100:8", nodes=2), at=1, project="a"),
        submit("small", task("H100:2"), at=2, project="a"),
        submit("other", task("H100:8"), at=3, project="b"),
    )
    p = plan(sm, now=3.0, quotas={"a": 4, "b": 8})
    apply_plan(sm, p)
    assert why(sm, "big") == (
        "needs 16 GPUs but project a may hold at most 4 (max_gpus): raise its quota "
        "(meshgpu project quota a --max-gpus N)"
    )
    assert placed(sm, "small") and placed(sm, "other")
    assert not p.reservations


def test_a_quota_of_zero_holds_gpu_jobs_but_not_cpu_jobs() -> None:
    sm = world(
        host("n1", 8),
        submit("gpu", task("H100:1"), at=1, project="a"),
        submit("cpu", task(None), at=2, project="a"),
    )
    apply_plan(sm, plan(sm, now=3.0, quotas={"a": 0}))
    assert placed(sm, "cpu") and not placed(sm, "gpu")


def test_a_host_split_into_blocks_counts_the_gpus_it_gives() -> None:
    # Blocks of 2 GPUs: a job asking 1..2 GPUs gets 2, so a 3-GPU quota fits one job only.
    sm = world(
        host("n1", 8, blocks=4),
        submit("a0", task("1..2"), at=1, project="a"),
        submit("a1", task("1..2"), at=2, project="a"),
    )
    apply_plan(sm, plan(sm, now=3.0, quotas={"a": 3}))
    assert placed(sm, "a0") and not placed(sm, "a1")
    assert why(sm, "a1") == (
        "project a uses 2 of its 3 GPUs (max_gpus): waiting for one of its jobs to end"
    )


def test_assign_jobs_rechecks_the_replicated_quota_and_a_quota_change_replans() -> None:
    sm = world(
        host("n1", 8),
        submit("a0", task("H100:2"), at=1, project="a"),
        submit("a1", task("H100:2"), at=2, project="a"),
    )
    replicated = Replicated()
    replicated.jobs = sm
    before = sm.demand_version
    for cmd in (CreateProject(at=1, name="a"), SetProjectQuota(at=1, name="a", max_gpus=2)):
        res = replicated.apply([(sm.applied_index + 1, encode_cluster(cmd))])[0]
        assert res.ok, res.error
    assert sm.demand_version > before  # the scheduler plans again when a quota moves
    assert replicated.cluster.access.quotas() == {"a": 2}
    # A decision planned without the quota (a stale leader) is refused on apply.
    a0, a1 = (jobs(sm, r)[0].job_id for r in ("a0", "a1"))
    res = sm.apply_command(
        AssignJobs(
            at=3,
            assignments=[
                Assignment(job_id=a0, node_id="n1", gpu_indices=[0, 1]),
                Assignment(job_id=a1, node_id="n1", gpu_indices=[2, 3]),
            ],
        )
    )
    assert res.value["accepted"] == [a0]
    assert res.value["refused"] == {a1: "project a uses 2 of its 2 GPUs (max_gpus)"}
    assert jobs(sm, "a1")[0].status is JobStatus.SUBMITTED
