"""The queue, backfill, gangs, clusters, blocks, filters and reasons of the pure scheduler."""

from __future__ import annotations

from meshgpu.scheduler import QUEUED, SchedulerPolicy, plan
from meshgpu.state import AssignJobs, Assignment, JobStatus, StateMachine
from tests.scheduler._world import (
    apply_plan,
    finish,
    host,
    jobs,
    resources,
    schedule,
    status,
    submit,
    task,
    world,
)


def placed(sm: StateMachine, run: str) -> bool:
    return all(j.status.holds_resources() for j in jobs(sm, run))


def where(sm: StateMachine, run: str) -> list[str | None]:
    return [j.node_id for j in jobs(sm, run)]


# -- queue ------------------------------------------------------------------------------------


def test_priority_first_then_fifo() -> None:
    sm = world(
        host("n1", 4),
        submit("old", task("H100:2"), at=1),
        submit("mid", task("H100:2"), at=2),
        submit("late-urgent", task("H100:2", priority=80), at=3),
    )
    schedule(sm)
    assert placed(sm, "late-urgent") and placed(sm, "old")
    assert not placed(sm, "mid")
    assert jobs(sm, "mid")[0].why_pending.startswith("needs 2xH100 on one host")


def test_fair_share_between_projects_at_equal_priority() -> None:
    # Project a queued first, but b holds nothing: they alternate, fewest GPUs held first.
    cmds = [submit(f"a{i}", task("H100:1"), at=1 + i * 0.1, project="a") for i in range(4)]
    cmds += [submit(f"b{i}", task("H100:1"), at=2 + i * 0.1, project="b") for i in range(4)]
    sm = world(host("n1", 4), *cmds)
    schedule(sm)
    assert [placed(sm, f"a{i}") for i in range(4)] == [True, True, False, False]
    assert [placed(sm, f"b{i}") for i in range(4)] == [True, True, False, False]
    # Without fair share: one FIFO line.
    sm = world(host("n1", 4), *cmds)
    schedule(sm, policy=SchedulerPolicy(fair_share=False))
    assert all(placed(sm, f"a{i}") for i in range(4)) and not any(
        placed(sm, f"b{i}") for i in range(4)
    )


def test_fair_share_counts_what_a_project_already_holds() -> None:
    sm = world(host("n1", 8), submit("a-big", task("H100:6"), project="a"))
    schedule(sm)
    sm.apply_command(submit("a1", task("H100:1"), at=4, project="a"))
    sm.apply_command(submit("b1", task("H100:1"), at=5, project="b"))
    sm.apply_command(submit("b2", task("H100:1"), at=6, project="b"))
    schedule(sm, now=7)
    assert placed(sm, "b1") and placed(sm, "b2") and not placed(sm, "a1")


# -- backfill ---------------------------------------------------------------------------------


def test_backfill_only_jobs_that_end_before_the_reserved_start() -> None:
    sm = world(host("n1", 8), submit("running", task("H100:6", max_duration=3600), at=0))
    schedule(sm, now=0)
    sm.apply_command(submit("head", task("H100:8"), at=10))
    sm.apply_command(submit("short", task("H100:2", max_duration=600), at=11))
    sm.apply_command(submit("long", task("H100:2", max_duration=7200), at=12))
    sm.apply_command(submit("open", task("H100:2"), at=13))
    p, _ = schedule(sm, now=20)
    # head's reserved start: running's deadline (started at 0, + 3600, + 300 stop + 30 margin)
    [r] = p.reservations
    assert r.gang == ("head", 0) and r.start == 3930 and r.need == {"n1": 8}
    assert placed(sm, "short")  # 20 + 600 start + 600 + 330 <= 3930: gone before head starts
    assert not placed(sm, "long") and not placed(sm, "open")
    assert jobs(sm, "head")[0].why_pending == "needs 8xH100 on one host; largest free: 2 on n1"
    # long is the first of its kind to wait (n1 is now full), open waits behind it.
    assert jobs(sm, "long")[0].why_pending == "needs 2xH100 on one host; largest free: 0 on n1"
    assert jobs(sm, "open")[0].why_pending == QUEUED


def test_backfill_into_slack_never_delays_the_head() -> None:
    # At the reserved start n1 has 8 free and the head needs 4: 4 may be used meanwhile, by
    # anything, and no more.
    sm = world(host("n1", 8), submit("running", task("H100:6", max_duration=3600), at=0))
    schedule(sm, now=0)
    sm.apply_command(submit("head", task("H100:8", nodes=1, resources=resources("H100:4")), at=1))
    # A second host-level blocker: 4 GPUs do not fit on n1's 2 free.
    sm.apply_command(submit("a", task("H100:1"), at=2))
    sm.apply_command(submit("b", task("H100:1"), at=3))
    sm.apply_command(submit("c", task("H100:1"), at=4))
    p, _ = schedule(sm, now=5)
    [r] = p.reservations
    assert r.need == {"n1": 4} and r.slack == {"n1": 2}  # 8 free at the start, 4 needed, 2 used
    assert placed(sm, "a") and placed(sm, "b") and not placed(sm, "c")


def test_no_backfill_on_reserved_hosts_when_the_start_is_unknown() -> None:
    sm = world(host("n1", 8), host("n2", 2, name="T4", mem_gb=16))
    sm.apply_command(submit("hog", task("H100:6"), at=0))  # no max_duration: no known end
    schedule(sm, now=0)
    sm.apply_command(submit("head", task("H100:8"), at=1))
    sm.apply_command(submit("short", task("H100:1", max_duration=60), at=2))
    sm.apply_command(submit("t4", task("T4:1"), at=3))
    p, _ = schedule(sm, now=5)
    [r] = p.reservations
    assert r.start == float("inf") and r.slack == {"n1": 0}
    assert not placed(sm, "short") and placed(sm, "t4")  # elsewhere, freely
    finish(sm, "hog")
    schedule(sm, now=10)
    assert placed(sm, "head") and not placed(sm, "short")


def test_without_now_nothing_is_backfilled_onto_reserved_hosts() -> None:
    sm = world(host("n1", 8), submit("running", task("H100:6", max_duration=60), at=0))
    schedule(sm, now=0)
    sm.apply_command(submit("head", task("H100:8"), at=1))
    sm.apply_command(submit("short", task("H100:1", max_duration=1), at=2))
    schedule(sm, now=None)
    assert not placed(sm, "short")


# -- gangs and clusters -----------------------------------------------------------------------


def test_gang_on_distinct_hosts_in_one_cluster() -> None:
    sm = world(
        host("a1", 8, labels={"cluster": "a"}),
        host("a2", 4, labels={"cluster": "a"}),
        host("b1", 8, labels={"cluster": "b"}),
        host("b2", 8, labels={"cluster": "b"}),
        submit("dist", task("H100:4", nodes=2)),
    )
    schedule(sm)
    nodes = where(sm, "dist")
    assert len(set(nodes)) == 2
    labels = {sm.nodes[n].labels["cluster"] for n in nodes if n}
    assert len(labels) == 1


def test_placement_any_lets_a_gang_span_clusters() -> None:
    cmds = [host("a1", 8, labels={"cluster": "a"}), host("b1", 8, labels={"cluster": "b"})]
    sm = world(*cmds, submit("dist", task("H100:8", nodes=2)))
    schedule(sm)
    assert not placed(sm, "dist")
    assert "only 1 can ever run it" in jobs(sm, "dist")[0].why_pending
    sm = world(*cmds, submit("dist", task("H100:8", nodes=2, placement="any")))
    schedule(sm)
    assert placed(sm, "dist")


def test_a_gang_that_cannot_fit_waits_whole_and_holds_its_hosts() -> None:
    sm = world(host("n1", 8), host("n2", 8), submit("three", task("H100:8", nodes=3)))
    sm.apply_command(submit("small", task("H100:1"), at=3))
    p, _ = schedule(sm)
    assert status(sm, "three") == {JobStatus.SUBMITTED}
    assert jobs(sm, "three")[0].why_pending == (
        "needs 3 hosts for 8xH100 each; only 2 can ever run it: waiting for more hosts to join"
    )
    assert jobs(sm, "small")[0].why_pending == QUEUED
    # On a fixed mesh the operator may let others use those hosts meanwhile.
    sm = world(host("n1", 8), host("n2", 8), submit("three", task("H100:8", nodes=3)))
    sm.apply_command(submit("small", task("H100:1"), at=3))
    schedule(sm, policy=SchedulerPolicy(hold_for_oversized_gangs=False))
    assert placed(sm, "small") and not placed(sm, "three")


def test_half_a_gang_is_never_placed_even_when_half_fits() -> None:
    sm = world(host("n1", 8), host("n2", 8), submit("hog", task("H100:4")))
    schedule(sm)
    sm.apply_command(submit("pair", task("H100:8", nodes=2), at=4))
    p, _ = schedule(sm)
    assert not [a for a in p.assignments if a.job_id.startswith("id-pair")]
    assert status(sm, "pair") == {JobStatus.SUBMITTED}
    assert jobs(sm, "pair")[0].why_pending == "needs 2 hosts with 8xH100 each; 1 have room now"


def test_assign_jobs_refuses_half_a_gang_and_stale_gangs_whole() -> None:
    sm = world(host("n1", 8), host("n2", 8), submit("pair", task("H100:4", nodes=2)))
    j0, j1 = jobs(sm, "pair")
    half = AssignJobs(
        at=3, assignments=[Assignment(job_id=j0.job_id, node_id="n1", gpu_indices=[0])]
    )
    res = sm.apply_command(half).value
    assert res["accepted"] == [] and "gang starts whole" in res["refused"][j0.job_id]
    clash = AssignJobs(
        at=3,
        assignments=[
            Assignment(job_id=j0.job_id, node_id="n1", gpu_indices=[0, 1]),
            Assignment(job_id=j1.job_id, node_id="n1", gpu_indices=[1, 2]),
        ],
    )
    res = sm.apply_command(clash).value
    assert res["accepted"] == [] and set(res["refused"]) == {j0.job_id, j1.job_id}
    assert status(sm, "pair") == {JobStatus.SUBMITTED}


# -- blocks -----------------------------------------------------------------------------------


def test_blocks_take_the_smallest_matching_share() -> None:
    sm = world(
        host("b", 8, blocks=4, cpus=64, memory_gb=512),
        submit("two", task("H100:2")),
        submit("four", task("H100:4"), at=3),
        submit("cpu-heavy", task(resources=resources("H100:2", cpu="30..")), at=4),
    )
    schedule(sm)
    two, four, heavy = (jobs(sm, r)[0] for r in ("two", "four", "cpu-heavy"))
    assert (two.blocks, len(two.gpu_indices)) == (1, 2)
    assert (four.blocks, len(four.gpu_indices)) == (2, 4)
    # 30 CPUs need 2 blocks (16 CPUs each), whose 4 GPUs break the exact 2-GPU request.
    assert heavy.status is JobStatus.SUBMITTED
    assert "no share of its 4 blocks" in heavy.why_pending
    assert sm.blocks_in_use("b") == 3


def test_blocks_auto_and_a_multi_node_job_takes_whole_hosts() -> None:
    sm = world(
        host("b1", 8, blocks="auto", cpus=96),
        host("b2", 8, blocks="auto", cpus=96),
        submit("one", task("H100:1")),
        submit("pair", task("H100:1..", nodes=2), at=3),
        submit("exact", task("H100:1", nodes=2), at=4),
    )
    assert sm.nodes["b1"].block_count() == 8
    schedule(sm)
    one = jobs(sm, "one")[0]
    assert one.blocks == 1
    # Each job of a multi-node run takes a whole host (all 8 blocks; dstack): b1 is not whole.
    assert status(sm, "pair") == {JobStatus.SUBMITTED}
    # ... and a whole host's 8 GPUs are not "exactly 1 GPU": that run can never start there.
    assert "a multi-node job takes the whole host" in jobs(sm, "exact")[0].why_pending
    finish(sm, "one")
    schedule(sm)
    assert [(j.blocks, len(j.gpu_indices)) for j in jobs(sm, "pair")] == [(8, 8), (8, 8)]


def test_assign_jobs_checks_blocks() -> None:
    sm = world(host("b", 8, blocks=2), submit("x", task("H100:4")), submit("y", task("H100:4")))
    x, y = jobs(sm, "x")[0], jobs(sm, "y")[0]
    res = sm.apply_command(
        AssignJobs(
            at=3,
            assignments=[
                Assignment(job_id=x.job_id, node_id="b", gpu_indices=[0, 1, 2, 3], blocks=2),
                Assignment(job_id=y.job_id, node_id="b", gpu_indices=[4, 5, 6, 7], blocks=1),
            ],
        )
    ).value
    assert res["accepted"] == [x.job_id] and "blocks of b are not free" in res["refused"][y.job_id]


# -- matching, filters, health ----------------------------------------------------------------


def test_filters_match_node_labels() -> None:
    sm = world(
        host("f1", 8, labels={"fleet": "one", "region": "eu-west", "backend": "aws"}),
        host("f2", 8, labels={"fleet": "two", "region": "us-east", "spot": "true"}),
        host("f3", 8, labels={"fleet": "two", "region": "us-east", "price": "9.5"}),
        submit("by-fleet", task("H100:8", fleets=["proj/one"])),
        submit("by-region", task("H100:8", regions=["US-EAST"], max_price=5.0), at=3),
        submit("spot", task("H100:8", spot_policy="spot"), at=4),
        submit("pinned", task("H100:1", instances=[{"name": "f3"}]), at=5),
        submit("nowhere", task("H100:1", backends=["gcp"]), at=6),
    )
    schedule(sm)
    assert where(sm, "by-fleet") == ["f1"]
    assert where(sm, "spot") == ["f2"]
    assert where(sm, "pinned") == ["f3"]
    # us-east and cheap enough: only the spot host, which on-demand (the default) refuses.
    assert "no host can ever run it" in jobs(sm, "by-region")[0].why_pending
    assert "backend is not gcp" in jobs(sm, "nowhere")[0].why_pending


def test_grammar_cpu_arch_memory_disk_shm_compute_capability() -> None:
    sm = world(
        host("arm", 4, cpus=32, memory_gb=256),
        host("big", 4, name="A100", mem_gb=40, cpus=128, memory_gb=1024),
    )
    sm.nodes["arm"].cpu_arch = "arm"
    cases = {
        "arch": resources("1", cpu="arm:8"),
        "mem": resources("1", memory="600GB.."),
        "shm": resources("1", shm_size="700GB"),
        "cc": resources({"count": 1, "compute_capability": "9.0"}),
        "total": resources({"count": 2, "total_memory": "80GB"}),
        "disk": resources("1", disk="5TB"),
    }
    for i, (name, res) in enumerate(cases.items()):
        sm.apply_command(submit(name, task(resources=res), at=2 + i))
    schedule(sm)
    assert where(sm, "arch") == ["arm"]
    assert (
        where(sm, "mem") == ["big"]
        and where(sm, "shm") == ["big"]
        and where(sm, "total") == ["big"]
    )
    assert where(sm, "cc") == ["arm"]  # H100 (9.0), not A100 (8.0)
    assert "disk" in jobs(sm, "disk")[0].why_pending


def test_unhealthy_gpus_and_draining_nodes_are_never_used() -> None:
    sm = world(host("sick", 8, unhealthy=(0, 1, 2)), host("drain", 8))
    sm.nodes["drain"] = sm.nodes["drain"].model_copy(update={"status": "draining"})
    sm.apply_command(submit("six", task("H100:6")))
    sm.apply_command(submit("five", task("H100:5"), at=3))
    schedule(sm)
    assert not placed(sm, "six")
    assert "sick has 5 matching GPUs, the job needs 6" in jobs(sm, "six")[0].why_pending
    five = jobs(sm, "five")[0]
    assert five.node_id == "sick" and not set(five.gpu_indices) & {0, 1, 2}


def test_gpus_inside_one_numa_node_and_best_connected() -> None:
    sm = world(
        host("n", 8),  # NUMA 0: GPUs 0-3, NUMA 1: GPUs 4-7
        submit("x", task("H100:3")),
        submit("y", task("H100:2"), at=3),
        submit("z", task("H100:1"), at=4),
    )
    schedule(sm)
    # x inside one NUMA node; y where 2 fit (NUMA 1); z in the tightest hole (NUMA 0's last).
    assert [jobs(sm, r)[0].gpu_indices for r in "xyz"] == [[0, 1, 2], [4, 5], [3]]
    # A topology: pairs (0,1), (2,3) NVLinked (level 0), everything else a PCIe switch (1).
    links = [[0 if a == b or a // 2 == b // 2 else 1 for b in range(4)] for a in range(4)]
    sm = world(host("t", 4, numa=1, links=links), submit("p", task("H100:1")))
    sm.apply_command(submit("q", task("H100:2"), at=3))
    schedule(sm)
    p_gpu = jobs(sm, "p")[0].gpu_indices[0]
    q = sorted(jobs(sm, "q")[0].gpu_indices)
    assert q[0] // 2 == q[1] // 2 and p_gpu // 2 != q[0] // 2  # the NVLinked pair left whole


def test_image_jobs_need_a_container_runtime() -> None:
    sm = world(host("bare", 8), host("docker", 8, runtime="docker"))
    sm.apply_command(submit("img", task("H100:8", image="ubuntu")))
    sm.apply_command(submit("img2", task("H100:8", image="ubuntu"), at=3))
    schedule(sm)
    assert where(sm, "img") == ["docker"]
    assert jobs(sm, "img2")[0].why_pending == "needs 8xH100 on one host; largest free: 0 on docker"


# -- reasons ----------------------------------------------------------------------------------


def test_every_waiting_job_has_a_stable_reason() -> None:
    cmds = [host(f"n{i}", 8) for i in range(3)]
    cmds += [submit(f"r{i}", task("H100:8"), at=i) for i in range(10)]
    sm = world(*cmds)
    p, _ = schedule(sm, now=20)
    waiting = {j.job_id for j in sm.waiting_jobs()}
    assert waiting == set(p.pending) and all(p.pending.values())
    assert jobs(sm, "r3")[0].why_pending == "needs 8xH100 on one host; largest free: 0 on n0"
    assert {jobs(sm, f"r{i}")[0].why_pending for i in range(4, 10)} == {QUEUED}
    again = plan(sm, now=30)
    changed = {j: w for j, w in again.pending.items() if sm.jobs[j].why_pending != w}
    assert changed == {}  # nothing changed: nothing to re-propose
    assert again.assignments == []


def test_plan_is_deterministic_and_leaves_no_trace() -> None:
    cmds = [host(f"n{i}", 8, labels={"cluster": f"c{i % 2}"}) for i in range(4)]
    cmds += [submit(f"r{i}", task(f"H100:{1 + i % 8}", nodes=1 + i % 2), at=i) for i in range(12)]
    sm = world(*cmds)
    first = plan(sm, now=5)
    second = plan(sm, now=5)  # the index rolled the first plan back
    assert first.assignments == second.assignments and first.pending == second.pending
    copy = StateMachine()
    copy.restore(sm.snapshot())
    third = plan(copy, now=5)
    assert third.assignments == first.assignments and third.pending == first.pending
    apply_plan(sm, first)
    assert all(j.status is not JobStatus.SUBMITTED or j.why_pending for j in sm.jobs.values())


def test_a_node_declared_dead_or_draining_takes_nothing_new() -> None:
    sm = world(host("n1", 8), host("n2", 8), submit("a", task("H100:8")))
    schedule(sm)
    assert where(sm, "a") == ["n1"]
    sm.set_node_status("n2", "draining")
    sm.apply_command(submit("b", task("H100:8"), at=4))
    schedule(sm)
    assert not placed(sm, "b")
    sm.set_node_status("n2", "active")
    assert [a.node_id for a in plan(sm, now=5).assignments] == ["n2"]  # (not applied)
    # Set in place, without going through the state (as a handler might): still seen.
    sm.nodes["n2"].status = "dead"
    schedule(sm)
    assert not placed(sm, "b")
    assert jobs(sm, "b")[0].why_pending == "needs 8xH100 on one host; largest free: 0 on n1"


def test_service_replicas_are_separate_gangs_and_task_groups_one_gang() -> None:
    from meshgpu.config import parse_config
    from meshgpu.config.render import to_json

    service = to_json(
        parse_config(
            "type: service\nimage: app\ncommands: [serve]\nport: 8000\nreplicas: 4\n"
            "resources:\n  gpu: H100:4\n"
        )
    )
    groups = to_json(
        parse_config(
            "type: task\ngroups:\n"
            "  - name: master\n    nodes: 1\n    commands: [m]\n    resources:\n      gpu: H100:8\n"
            "  - name: worker\n    nodes: 2\n    commands: [w]\n    resources:\n      gpu: A100:2\n"
        )
    )
    sm = world(
        host("h1", 8, runtime="docker"),  # the replicas are containers: they share hosts
        host("h2", 4, runtime="docker"),
        host("a1", 8, name="A100", mem_gb=40, labels={"cluster": "x"}),
        host("a2", 8, name="A100", mem_gb=40, labels={"cluster": "x"}),
        submit("svc", service),
        submit("grp", groups, at=3),
    )
    schedule(sm)
    # Three of four replicas fit (two on h1, one on h2); the fourth waits alone.
    replicas = jobs(sm, "svc")
    assert [j.status is JobStatus.RUNNING for j in replicas] == [True, True, True, False]
    assert replicas[3].why_pending == "needs 4xH100 on one host; largest free: 0 on h1"
    # The heterogeneous gang: the master needs an H100 host, in the workers' cluster -- no such
    # host, so none of the three starts.
    assert status(sm, "grp") == {JobStatus.SUBMITTED}
    sm.apply_command(host("a3", 8, labels={"cluster": "x"}))
    finish(sm, "svc")
    schedule(sm)
    grp = jobs(sm, "grp")
    assert [j.group for j in grp] == ["master", "worker", "worker"]
    assert [j.node_id for j in grp][0] == "a3" and {j.node_id for j in grp[1:]} == {"a1", "a2"}
    assert [len(j.gpu_indices) for j in grp] == [8, 2, 2]
