"""Host ports and spread: a process job holds its ports on its host (hosts sharing an internal IP
share them), a job whose port is taken everywhere says where and by whom, and a service's
replicas spread over hosts before they share one."""

from __future__ import annotations

from typing import Any

from meshgpu.state import AssignJobs, Assignment, JobStatus, RegisterNode, StateMachine
from tests.scheduler._world import host, resources, schedule, submit, world


def node(node_id: str, ip: str, gpus: int = 8, **more: Any) -> RegisterNode:
    return host(node_id, gpus, **more).model_copy(update={"internal_ip": ip})


def service(replicas: int = 2, port: int = 8000, gpu: Any = 1, **more: Any) -> dict[str, Any]:
    return {
        "type": "service",
        "commands": ["serve"],
        "port": {"container_port": port, "local_port": None},
        "replicas": {"min": replicas, "max": replicas},
        "resources": resources(gpu),
        **more,
    }


def hosts_of(sm: StateMachine, run: str) -> list[str | None]:
    return [sm.jobs[j].node_id for j in sm.runs[run].job_ids]


def test_two_replicas_on_a_three_host_mesh_land_on_two_hosts() -> None:
    sm = world(
        node("a", "10.0.0.1"),
        node("b", "10.0.0.2"),
        node("c", "10.0.0.3"),
        submit("web", service(2)),
    )
    schedule(sm)
    placed = hosts_of(sm, "web")
    assert None not in placed and len(set(placed)) == 2


def test_spread_prefers_other_hosts_but_shares_when_nothing_else_fits() -> None:
    # Containers (no host port): spread is only a preference.
    cfg = service(3, image="app")
    sm = world(
        node("a", "10.0.0.1", runtime="docker"),
        node("b", "10.0.0.2", runtime="docker"),
        submit("web", cfg),
    )
    schedule(sm)
    placed = hosts_of(sm, "web")
    assert None not in placed and set(placed) == {"a", "b"}


def test_hosts_sharing_an_ip_never_share_a_port_and_why_pending_names_the_holder() -> None:
    sm = world(
        node("a", "10.0.0.1"),
        node("b", "10.0.0.1"),  # same address as a
        node("c", "10.0.0.2"),
        submit("web", service(3)),
    )
    schedule(sm)
    jobs = [sm.jobs[j] for j in sm.runs["web"].job_ids]
    placed = [j for j in jobs if j.node_id is not None]
    assert len(placed) == 2
    assert {sm.nodes[j.node_id].internal_ip for j in placed if j.node_id} == {
        "10.0.0.1",
        "10.0.0.2",
    }
    (waiting,) = [j for j in jobs if j.status is JobStatus.SUBMITTED]
    assert waiting.why_pending == "port 8000 is in use on 10.0.0.1 by run web"


def test_another_run_holding_the_port_keeps_a_job_waiting_until_it_ends() -> None:
    task_with_port = {
        "type": "task",
        "commands": ["x"],
        "ports": [{"container_port": 8000, "local_port": None}],
        "resources": resources(1),
    }
    sm = world(
        node("a", "10.0.0.9"), submit("api", task_with_port), submit("web", service(1), at=3)
    )
    schedule(sm)
    (web,) = [sm.jobs[j] for j in sm.runs["web"].job_ids]
    assert web.status is JobStatus.SUBMITTED
    assert web.why_pending == "port 8000 is in use on 10.0.0.9 by run api"
    # Another port fits beside it.
    sm.apply_command(submit("other", service(1, port=9000), at=4))
    schedule(sm)
    assert all(sm.jobs[j].node_id == "a" for j in sm.runs["other"].job_ids)


def test_a_stale_assignment_onto_a_taken_port_is_refused_at_apply() -> None:
    sm = world(node("a", "10.0.0.1"), node("b", "10.0.0.1"), submit("web", service(2)))
    first, second = sm.runs["web"].job_ids
    res = sm.apply_command(
        AssignJobs(
            at=3.0,
            assignments=[
                Assignment(job_id=first, node_id="a", gpu_indices=[0]),
                Assignment(job_id=second, node_id="b", gpu_indices=[0]),
            ],
        )
    )
    assert res.value["accepted"] == [first]
    assert res.value["refused"] == {second: "port 8000 is in use on 10.0.0.1 by run web"}


def test_container_jobs_do_not_hold_host_ports() -> None:
    sm = world(node("a", "10.0.0.1", runtime="docker"), submit("web", service(2, image="app")))
    schedule(sm)
    assert hosts_of(sm, "web") == ["a", "a"]
