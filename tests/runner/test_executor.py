"""What the executor hands a job at start, computed from the replicated state: the commands with
``${{ groups[i].nodes[j].IP_ADDRESS }}`` resolved, and the cluster variables and MPI hostfile of
the job's replica. A StateMachine fed commands directly, a real ProcessRunner that only prepares
directories (no process is started)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshgpu.config import parse_config
from meshgpu.config.render import to_json
from meshgpu.runner import JobLaunch, ProcessRunner
from meshgpu.runner.executor import Executor
from meshgpu.state import (
    AssignJobs,
    Assignment,
    GPURecord,
    JobRecord,
    RegisterNode,
    StateMachine,
    SubmitRun,
)

IPS = {"n1": "10.9.0.1", "n2": "10.9.0.2", "n3": "10.9.0.3"}


def _state() -> StateMachine:
    sm = StateMachine()
    for node_id, ip in IPS.items():
        sm.apply_command(
            RegisterNode(
                at=1.0,
                node_id=node_id,
                name=node_id,
                internal_ip=ip,
                gpus=[
                    GPURecord(
                        index=i,
                        uuid=f"{node_id}-{i}",
                        name="H100",
                        vendor="nvidia",
                        memory_mib=81920,
                    )
                    for i in range(2)
                ],
                cpu_count=16,
                memory_mib=64 * 1024,
                disk_gb=500,
            )
        )
    return sm


def _submit(sm: StateMachine, name: str, text: str) -> list[JobRecord]:
    sm.apply_command(
        SubmitRun(
            at=2.0,
            request_id=f"req-{name}",
            run_id=f"id-{name}",
            run_name=name,
            config=to_json(parse_config(text)),
        )
    )
    return sm.run_jobs(sm.runs[name])


def _assign(sm: StateMachine, placement: list[tuple[JobRecord, str, list[int]]]) -> None:
    result = sm.apply_command(
        AssignJobs(
            at=3.0,
            assignments=[
                Assignment(job_id=j.job_id, node_id=n, gpu_indices=g) for j, n, g in placement
            ],
        )
    )
    assert result.ok and not result.value["refused"], result


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[ProcessRunner]:
    r = ProcessRunner(tmp_path / "jobs", use_launcher=False)
    yield r
    await r.aclose()


def _prepare(sm: StateMachine, runner: ProcessRunner, job: JobRecord) -> JobLaunch:
    ex = Executor(
        job.node_id or "",
        sm,
        runner,
        propose=None,
        code_dir=Path("/nonexistent"),
        gpu_vendor=lambda: "nvidia",
    )  # type: ignore[arg-type]
    run = sm.runs[job.run_name]
    return ex._prepare(job, run.run_args, run.spec, job.epoch)


TWO_GROUPS = """\
type: task
groups:
  - name: head
    nodes: 1
    commands:
      - echo head sees ${{ groups[1].nodes[1].IP_ADDRESS }} and $${{ groups[0].nodes[0].IP_ADDRESS }}
    resources: {gpu: 2}
  - name: workers
    nodes: 2
    commands:
      - ray start --address=${{ groups[0].nodes[0].IP_ADDRESS }}:6379 --block
    resources: {gpu: 1}
"""


async def test_group_node_addresses_resolve_to_the_hosts_placed(runner: ProcessRunner) -> None:
    sm = _state()
    head, w0, w1 = _submit(sm, "ray", TWO_GROUPS)
    assert (head.group, w0.group, w1.group) == ("head", "workers", "workers")
    # Placed out of node order, so that a job-order/node-order mix-up shows.
    _assign(sm, [(head, "n3", [0, 1]), (w0, "n1", [1]), (w1, "n2", [0])])
    launches = {j.job_id: _prepare(sm, runner, sm.jobs[j.job_id]) for j in (head, w0, w1)}
    assert launches[head.job_id].commands == (
        "echo head sees 10.9.0.2 and ${{ groups[0].nodes[0].IP_ADDRESS }}",
    )
    for w in (w0, w1):
        assert launches[w.job_id].commands == ("ray start --address=10.9.0.3:6379 --block",)
    # One cluster across both groups, in job order: the head (groups[0].nodes[0]) is the master.
    for rank, job in enumerate((head, w0, w1)):
        env = launches[job.job_id].env
        assert env["MESHGPU_NODE_RANK"] == env["DSTACK_NODE_RANK"] == str(rank)
        assert env["MESHGPU_NODES_NUM"] == "3"
        assert env["MESHGPU_NODES_IPS"] == "10.9.0.3\n10.9.0.1\n10.9.0.2"
        assert env["MESHGPU_MASTER_NODE_IP"] == env["DSTACK_MASTER_NODE_IP"] == "10.9.0.3"
        assert env["MESHGPU_GPUS_PER_NODE"] == ("2" if job is head else "1")
        assert env["MESHGPU_GPUS_NUM"] == "4"
        hostfile = Path(env["MESHGPU_MPI_HOSTFILE"]).read_text()
        assert hostfile == "10.9.0.3 slots=2\n10.9.0.1 slots=1\n10.9.0.2 slots=1\n"
    assert launches[w0.job_id].env["CUDA_VISIBLE_DEVICES"] == "1"


async def test_a_task_without_groups_is_group_zero(runner: ProcessRunner) -> None:
    sm = _state()
    jobs = _submit(
        sm,
        "ddp",
        "type: task\nnodes: 2\ncommands:\n"
        "  - echo ${{ groups[0].nodes[0].IP_ADDRESS }} ${{ groups[0].nodes[1].IP_ADDRESS }}\n"
        "resources: {gpu: 0}\n",
    )
    _assign(sm, [(jobs[0], "n2", []), (jobs[1], "n1", [])])
    for rank, job in enumerate(jobs):
        launch = _prepare(sm, runner, sm.jobs[job.job_id])
        assert launch.commands == ("echo 10.9.0.2 10.9.0.1",)
        assert launch.env["MESHGPU_NODE_RANK"] == str(rank)
        assert (launch.env["MESHGPU_GPUS_PER_NODE"], launch.env["MESHGPU_GPUS_NUM"]) == ("0", "0")
        # CPU nodes: bare addresses in the hostfile (no slots).
        assert Path(launch.env["MESHGPU_MPI_HOSTFILE"]).read_text() == "10.9.0.2\n10.9.0.1\n"


async def test_service_replicas_are_clusters_of_their_own(runner: ProcessRunner) -> None:
    sm = _state()
    text = (
        "type: service\nport: 8000\nreplicas:\n"
        "  - name: router\n    replicas: 1\n"
        "    commands: ['route --to ${{ groups[1].replicas[1].IP_ADDRESS }}']\n"
        "  - name: workers\n    replicas: 2\n    commands: [serve]\n    resources: {gpu: 1}\n"
    )
    router, w0, w1 = _submit(sm, "svc", text)
    # Each replica is its own gang: place them one by one.
    _assign(sm, [(router, "n1", [])])
    _assign(sm, [(w0, "n2", [0])])
    _assign(sm, [(w1, "n3", [1])])
    launch = _prepare(sm, runner, sm.jobs[router.job_id])
    assert launch.commands == ("route --to 10.9.0.3",)
    env = _prepare(sm, runner, sm.jobs[w1.job_id]).env
    # dstack: a service replica's cluster is that replica alone.
    assert (env["MESHGPU_NODE_RANK"], env["MESHGPU_NODES_NUM"]) == ("0", "1")
    assert env["MESHGPU_NODES_IPS"] == env["MESHGPU_MASTER_NODE_IP"] == "10.9.0.3"
    assert (env["MESHGPU_GPUS_PER_NODE"], env["MESHGPU_GPUS_NUM"]) == ("1", "1")


async def test_a_referenced_replica_not_placed_yet_fails_the_start(
    runner: ProcessRunner,
) -> None:
    sm = _state()
    text = (
        "type: service\nport: 8000\nreplicas:\n"
        "  - name: router\n    replicas: 1\n"
        "    commands: ['route --to ${{ groups[1].replicas[0].IP_ADDRESS }}']\n"
        "  - name: workers\n    replicas: 1\n    commands: [serve]\n"
    )
    router, _worker = _submit(sm, "svc", text)
    _assign(sm, [(router, "n1", [])])
    with pytest.raises(ValueError, match=r"groups\[1\]\.replicas\[0\]\.IP_ADDRESS.*not placed"):
        _prepare(sm, runner, sm.jobs[router.job_id])
