"""Hypothesis properties of the pure scheduler, checked on every plan of random histories:

* no GPU (or block) is ever allocated twice, and the state accepts every decision;
* a gang is placed whole (on distinct hosts, in one cluster) or not at all;
* a higher-priority job is never passed over by a lower one: the decisions for priority >= p do
  not change when every waiting run below p is removed -- and backfill never delays a reserved
  start (checked against the deadlines, independently of how the plan chose);
* every waiting job has a reason;
* preemption happens only when the preemptor then fits, on opted-in, lower-priority, whole gangs.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from meshgpu.scheduler import Plan, SchedulerPolicy, plan
from meshgpu.scheduler.capacity import _INDEXES, HostIndex
from meshgpu.scheduler.deadlines import Deadlines
from meshgpu.scheduler.filters import run_filters
from meshgpu.scheduler.matching import req_of, spec_of, static_fit
from meshgpu.state import (
    JobFinished,
    JobStatus,
    JobTerminationReason,
    RegisterNode,
    StateMachine,
    StopRun,
)
from tests.scheduler._world import apply_plan, host, resources, submit, task

GPU_SPECS = ["1", "2", "4", "8", "H100:1", "A100:2", "H100:3", "0", "1..", "A100:4"]

hosts_st = st.lists(
    st.tuples(
        st.sampled_from([0, 2, 4, 8, 8]),  # GPUs
        st.sampled_from(["H100", "A100"]),
        st.sampled_from([None, None, None, 2, "auto"]),  # blocks
        st.sampled_from([None, "a", "b"]),  # cluster label
        st.sampled_from([None, None, None, "always", "never"]),  # preemption label
        st.sets(st.integers(0, 7), max_size=2),  # unhealthy GPUs
        st.booleans(),  # max_duration known on the host's jobs? (only shapes the history)
    ),
    min_size=1,
    max_size=4,
)

submit_st = st.tuples(
    st.sampled_from(GPU_SPECS),
    st.sampled_from([1, 1, 1, 2, 3]),  # nodes
    st.sampled_from([0, 0, 1, 5, 9]),  # priority
    st.sampled_from(["p", "q"]),  # project
    st.sampled_from([None, None, 600, 3600]),  # max_duration
    st.booleans(),  # preemptible
    st.booleans(),  # retry
)
# A round: some submissions, time passing, a scheduling pass, then some jobs ending (done, or
# done stopping after a preemption) and maybe a run stopped by its user.
round_st = st.tuples(
    st.lists(submit_st, max_size=5),
    st.integers(1, 3000),
    st.lists(st.integers(0, 40), max_size=3),
    st.lists(st.integers(0, 40), max_size=3),
    st.one_of(st.none(), st.integers(0, 40)),
)


def build_hosts(spec: list[tuple[Any, ...]]) -> list[RegisterNode]:
    out = []
    for i, (gpus, name, blocks, cluster, preemption, sick, _) in enumerate(spec):
        labels = {}
        if cluster:
            labels["cluster"] = cluster
        if preemption:
            labels["preemption"] = preemption
        out.append(
            host(
                f"h{i}",
                gpus,
                name,
                80 if name == "H100" else 40,
                labels=labels,
                blocks=blocks if gpus else None,
                cpus=32,
                unhealthy=tuple(g for g in sick if g < gpus),
            )
        )
    return out


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(hosts_st, st.lists(round_st, min_size=1, max_size=8))
def test_scheduler_properties(hosts: list[tuple[Any, ...]], rounds: list[tuple[Any, ...]]) -> None:
    sm = StateMachine()
    for cmd in build_hosts(hosts):
        sm.apply_command(cmd)
    t = 10.0
    n = 0
    for submits, dt, done, stopped, stop in rounds:
        for gpu, nodes, priority, project, limit, preemptible, retry in submits:
            t += 1
            config = task(
                resources=resources(gpu),
                nodes=nodes,
                priority=priority,
                max_duration=limit,
                preemptible=preemptible,
                retry=retry,
            )
            sm.apply_command(submit(f"r{n}", config, at=t, project=project))
            n += 1
        t += dt
        p = plan(sm, now=t)
        check_plan(sm, p, t)
        res = apply_plan(sm, p, at=t)
        assert res["refused"] == {}, "the state refused a decision of the plan"
        if p.preemptions:
            wanted = {j for pre in p.preemptions for j in pre.job_ids}
            assert set(res["preempt"]["preempted"]) == wanted
        t += 1
        end_jobs(sm, done, JobTerminationReason.DONE_BY_RUNNER, t)
        end_jobs(sm, stopped, JobTerminationReason.TERMINATED_BY_USER, t)
        if stop is not None and sm.runs:
            sm.apply_command(StopRun(at=t, run_name=sorted(sm.runs)[stop % len(sm.runs)]))
    p = plan(sm, now=t + 1)
    check_plan(sm, p, t + 1)
    check_indexes(sm)
    check_index(sm)


def check_indexes(sm: StateMachine) -> None:
    """The state's incremental indexes equal the ones a restore builds from scratch."""
    fresh = StateMachine()
    fresh.restore(sm.snapshot())
    assert set(sm.waiting) == set(fresh.waiting)
    assert {n: set(js) for n, js in sm.held.items() if js} == {
        n: set(js) for n, js in fresh.held.items() if js
    }
    assert sm.project_gpus == fresh.project_gpus
    assert {k: [j.job_id for j in g.jobs] for k, g in sm.queue.gangs.items()} == {
        k: [j.job_id for j in g.jobs] for k, g in fresh.queue.gangs.items()
    }
    assert {k: c.order for k, c in sm.queue.classes.items()} == {
        k: c.order for k, c in fresh.queue.classes.items()
    }
    assert set(sm.queue.classes) == {k for k, c in sm.queue.classes.items() if c.order}


def end_jobs(sm: StateMachine, picks: list[int], reason: JobTerminationReason, t: float) -> None:
    """End the jobs of some runs: done ones end running jobs, stopped ones those stopping."""
    for pick in picks:
        if not sm.runs:
            return
        run = sm.runs[sorted(sm.runs)[pick % len(sm.runs)]]
        for j in sm.run_jobs(run):
            ends = j.status.holds_resources()
            if reason is JobTerminationReason.TERMINATED_BY_USER:
                ends = j.status is JobStatus.TERMINATING
            if ends:
                sm.apply_command(JobFinished(at=t, job_id=j.job_id, epoch=j.epoch, reason=reason))


# -- the checks --------------------------------------------------------------------------------


def gangs_waiting(sm: StateMachine) -> dict[tuple[str, int], list[Any]]:
    out: dict[tuple[str, int], list[Any]] = {}
    for j in sm.waiting_jobs():
        out.setdefault((j.run_name, j.replica_num), []).append(j)
    return out


def check_plan(sm: StateMachine, p: Plan, now: float) -> None:
    # Shown by --hypothesis-show-statistics: how often the checks met real decisions.
    event(f"assignments: {min(len(p.assignments), 3)}")
    event(f"reservations: {min(len(p.reservations), 2)}")
    event(f"preemptions: {min(len(p.preemptions), 1)}")
    check_no_double_allocation(sm, p)
    check_gangs_whole(sm, p)
    check_reasons(sm, p)
    check_preemptions(sm, p)
    check_reservations(sm, p, now)
    check_priority_independence(sm, p, now)


def check_no_double_allocation(sm: StateMachine, p: Plan) -> None:
    held: dict[str, list[int]] = {}
    blocks: dict[str, int] = {}
    for j in sm.jobs.values():
        if j.status.holds_resources():
            held.setdefault(j.node_id, []).extend(j.gpu_indices)
            blocks[j.node_id] = blocks.get(j.node_id, 0) + j.blocks
    for a in p.assignments:
        node = sm.nodes[a.node_id]
        assert node.status == "active"
        healthy = {g.index for g in node.gpus if g.healthy}
        assert set(a.gpu_indices) <= healthy, "an unhealthy or missing GPU was assigned"
        held.setdefault(a.node_id, []).extend(a.gpu_indices)
        blocks[a.node_id] = blocks.get(a.node_id, 0) + a.blocks
        total = node.block_count()
        assert (total is None) == (a.blocks == 0)
    for node_id, gpus in held.items():
        assert len(gpus) == len(set(gpus)), f"a GPU of {node_id} is allocated twice"
        total = sm.nodes[node_id].block_count()
        if total is not None:
            assert blocks[node_id] <= total, f"{node_id} has more blocks out than it has"


def check_gangs_whole(sm: StateMachine, p: Plan) -> None:
    assigned = {a.job_id: a for a in p.assignments}
    for key, members in gangs_waiting(sm).items():
        got = [assigned[j.job_id] for j in members if j.job_id in assigned]
        assert not got or len(got) == len(members), f"gang {key} half placed"
        if len(got) > 1:
            nodes = [a.node_id for a in got]
            assert len(set(nodes)) == len(nodes), f"gang {key} put two jobs on one host"
            if run_filters(sm.runs[key[0]].spec.placement).cluster:
                clusters = {sm.nodes[n].labels.get("cluster", "") for n in nodes}
                assert len(clusters) == 1, f"gang {key} spans clusters {clusters}"


def check_reasons(sm: StateMachine, p: Plan) -> None:
    assigned = {a.job_id for a in p.assignments}
    for j in sm.waiting_jobs():
        if j.job_id in assigned:
            assert j.job_id not in p.pending
        else:
            assert p.pending.get(j.job_id), f"waiting job {j.job_id} has no reason"
    assert set(p.pending) <= {j.job_id for j in sm.waiting_jobs()}


def opted_in(sm: StateMachine, job: Any) -> bool:
    run = sm.runs[job.run_name]
    mates = [
        j
        for j in sm.run_jobs(run)
        if j.replica_num == job.replica_num and j.status.holds_resources()
    ]
    labels = [sm.nodes[j.node_id].labels.get("preemption") for j in mates]
    if "never" in labels:
        return False
    return run.config.get("preemptible") is True or all(x == "always" for x in labels)


def check_preemptions(sm: StateMachine, p: Plan) -> None:
    victims: set[str] = set()
    for pre in p.preemptions:
        by = sm.runs[pre.by_run]
        for job_id in pre.job_ids:
            v = sm.jobs[job_id]
            assert v.status in (JobStatus.PROVISIONING, JobStatus.PULLING, JobStatus.RUNNING)
            assert sm.runs[v.run_name].priority < by.priority, "preempted an equal or higher run"
            assert opted_in(sm, v), "preempted a run that did not opt in"
            victims.add(job_id)
        gangs = {(sm.jobs[j].run_name, sm.jobs[j].replica_num) for j in pre.job_ids}
        for run_name, replica in gangs:
            mates = {
                j.job_id
                for j in sm.run_jobs(sm.runs[run_name])
                if j.replica_num == replica and j.status.holds_resources()
            }
            assert mates <= set(pre.job_ids), "a victim gang was only partly preempted"
    # Each preemptor then fits: its targets use GPUs that are free once the victims and the
    # jobs already stopping are gone, and that nothing else (placed or promised) uses.
    busy: dict[str, set[int]] = {}
    for j in sm.jobs.values():
        stopping = j.status is JobStatus.TERMINATING
        if j.status.holds_resources() and not stopping and j.job_id not in victims:
            busy.setdefault(j.node_id, set()).update(j.gpu_indices)
    for a in p.assignments:
        busy.setdefault(a.node_id, set()).update(a.gpu_indices)
    by_runs = {pre.by_run for pre in p.preemptions}
    for (run_name, _), targets in p.preemption_targets.items():
        run = sm.runs[run_name]
        nodes = [a.node_id for a in targets]
        assert len(set(nodes)) == len(nodes)
        for a in targets:
            job = sm.jobs[a.job_id]
            assert job.status is JobStatus.SUBMITTED and job.run_name == run_name
            node = sm.nodes[a.node_id]
            healthy = {g.index for g in node.gpus if g.healthy}
            assert set(a.gpu_indices) <= healthy
            assert not set(a.gpu_indices) & busy.get(a.node_id, set()), "preemptor would not fit"
            busy.setdefault(a.node_id, set()).update(a.gpu_indices)
            req = req_of(
                spec_of(job.resources_key, job.resources), run.spec.placement, len(targets) > 1
            )
            fit = static_fit(req, node)
            assert fit.ok and fit.gpus == len(a.gpu_indices)
            assert set(a.gpu_indices) <= fit.matching
    assert by_runs <= {k[0] for k in p.preemption_targets}


def check_reservations(sm: StateMachine, p: Plan, now: float) -> None:
    """EASY backfill's promise, from the deadlines: at a reservation's start its hosts have
    room for the gang, whatever the plan placed after taking it."""
    dl = Deadlines(now, SchedulerPolicy())
    for r in p.reservations:
        for node_id, need in r.need.items():
            node = sm.nodes[node_id]
            total_blocks = node.block_count()
            healthy = {g.index for g in node.gpus if g.healthy}
            capacity = total_blocks if total_blocks is not None else len(healthy)
            held = [
                (dl.of_held(j, sm.runs[j.run_name].spec), _units(j, total_blocks, healthy))
                for j in sm.jobs.values()
                if j.node_id == node_id and j.status.holds_resources()
            ]
            new = [
                (
                    i,
                    dl.of_new(sm.runs[sm.jobs[a.job_id].run_name].spec),
                    _units(a, total_blocks, healthy),
                )
                for i, a in enumerate(p.assignments)
                if a.node_id == node_id
            ]
            if r.preempting:
                taken = [x for x in new if x[0] >= r.after and x[2]]
                assert not taken, "took GPUs a preemptor waits for"
                continue
            if r.start < math.inf:
                busy_at_start = sum(u for end, u in held if end > r.start)
                busy_at_start += sum(u for _, end, u in new if end > r.start)
                assert capacity - busy_at_start >= need, "backfill delayed a reserved start"
            else:
                free_before = capacity - sum(u for _, u in held)
                free_before -= sum(u for i, _, u in new if i < r.after)
                later = sum(u for i, _, u in new if i >= r.after)
                assert later <= max(0, free_before - need), "backfill onto an unknown start"


def _units(x: Any, total_blocks: int | None, healthy: set[int]) -> int:
    """What a job or an assignment takes of a host: blocks, or healthy GPUs."""
    return x.blocks if total_blocks is not None else len(set(x.gpu_indices) & healthy)


def check_priority_independence(sm: StateMachine, p: Plan, now: float) -> None:
    """Lower-priority waiting runs have no say in what happens to higher ones."""
    levels = sorted({sm.runs[k[0]].priority for k in gangs_waiting(sm)}, reverse=True)
    for level in levels[:-1] if len(levels) > 1 else []:
        copy = StateMachine()
        copy.restore(sm.snapshot())
        for run_name in {k[0] for k in gangs_waiting(copy)}:
            if copy.runs[run_name].priority < level:
                copy.apply_command(StopRun(at=now, run_name=run_name, abort=True))
        q = plan(copy, now=now)

        def at_least(job_id: str, level: int = level) -> bool:
            return sm.runs[sm.jobs[job_id].run_name].priority >= level

        assert [a for a in p.assignments if at_least(a.job_id)] == q.assignments
        assert [x for x in p.preemptions if sm.runs[x.by_run].priority >= level] == q.preemptions
        assert {j: w for j, w in p.pending.items() if at_least(j)} == q.pending


fill_st = st.tuples(
    st.sampled_from(["1", "2", "4", "8", "H100:2"]),
    st.sampled_from([1, 1, 2]),
    st.sampled_from([0, 1, 2]),
    st.sampled_from([None, 3600]),
    st.sampled_from([True, True, False]),  # preemptible
    st.booleans(),  # retry
)
urgent_st = st.tuples(
    st.sampled_from(["1", "2", "4", "8", "H100:3", "A100:2"]),
    st.sampled_from([1, 1, 2]),
    st.sampled_from([1, 3, 6, 9]),
    st.sampled_from([None, 600]),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([4, 8, 8]),
            st.sampled_from(["H100", "H100", "A100"]),
            st.sampled_from([None, None, 2]),
            st.sampled_from([None, "a"]),
            st.sampled_from([None, None, None, "always", "never"]),
            st.just(set()),
            st.just(False),
        ),
        min_size=1,
        max_size=3,
    ),
    st.lists(fill_st, min_size=2, max_size=10),
    st.lists(st.lists(urgent_st, min_size=1, max_size=3), min_size=1, max_size=4),
)
def test_preemption_properties(
    hosts: list[tuple[Any, ...]],
    fill: list[tuple[Any, ...]],
    waves: list[list[tuple[Any, ...]]],
) -> None:
    """A full mesh of (mostly preemptible) low-priority work, then waves of urgent runs."""
    sm = StateMachine()
    for cmd in build_hosts(hosts):
        sm.apply_command(cmd)
    t = 10.0
    for i, (gpu, nodes, priority, limit, preemptible, retry) in enumerate(fill):
        config = task(
            resources=resources(gpu),
            nodes=nodes,
            priority=priority,
            max_duration=limit,
            preemptible=preemptible,
            retry=retry,
        )
        sm.apply_command(submit(f"low{i}", config, at=t + i, project="p" if i % 2 else "q"))
    t += 100
    apply_plan(sm, plan(sm, now=t), at=t)
    for w, wave in enumerate(waves):
        for i, (gpu, nodes, priority, limit) in enumerate(wave):
            config = task(
                resources=resources(gpu), nodes=nodes, priority=priority, max_duration=limit
            )
            sm.apply_command(submit(f"hi{w}-{i}", config, at=t + i))
        t += 50
        p = plan(sm, now=t)
        check_plan(sm, p, t)
        res = apply_plan(sm, p, at=t)
        assert res["refused"] == {}
        wanted = {j for pre in p.preemptions for j in pre.job_ids}
        assert set(res.get("preempt", {}).get("preempted", [])) == wanted
        t += 20
        end_jobs(sm, list(range(len(sm.runs))), JobTerminationReason.TERMINATED_BY_USER, t)
    p = plan(sm, now=t + 1)
    check_plan(sm, p, t + 1)
    check_indexes(sm)
    check_index(sm)


def check_index(sm: StateMachine) -> None:
    """The scheduler's persistent host index equals one built from scratch."""
    plan(sm)  # syncs it
    index = _INDEXES[sm]
    fresh = HostIndex()
    fresh.sync(sm)
    assert index.order == fresh.order == sorted(fresh.hosts)
    assert set(index.hosts) == set(fresh.hosts)
    for node_id, kept in index.hosts.items():
        other = fresh.hosts[node_id]
        assert (kept.free, kept.free_blocks, kept.units) == (
            other.free,
            other.free_blocks,
            other.units,
        )
        assert kept.reservation is None and kept.planned == []
        assert node_id in kept.cls.buckets[kept.units] and node_id in kept.cls.members
    assert sorted(index.by_end) == index.by_end and len(index.by_end) == len(fresh.by_end)
    for cls in index.classes:
        assert cls.top == max((v for v, b in enumerate(cls.buckets) if b), default=-1)
        assert sum(len(b) for b in cls.buckets) == len(cls.members)
