"""A service replica group's own ``image``/``python``/``nvcc``/``docker``/``privileged``/
``spot_policy``/``reservation`` (dstack 0.22 ``groups:``): each job of the group runs with its
group's values, the service's where the group sets none -- in the compiled spec, in the
scheduler's placement (why-pending says why a group's replica waits), in the executor's launch,
and in what the support table refuses on a mesh that cannot run it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshgpu.config import parse_config
from meshgpu.config.loader import parse_config_located
from meshgpu.config.render import to_json
from meshgpu.config.spec import (
    DSTACK_BASE_IMAGE,
    DSTACK_DIND_IMAGE,
    START_DOCKERD,
    RunSpec,
    compile_run,
)
from meshgpu.config.support import MeshCapabilities, check_config
from meshgpu.runner import ProcessRunner
from meshgpu.runner.executor import Executor
from meshgpu.state import AssignJobs, Assignment, JobStatus, RegisterNode, StateMachine
from tests.scheduler._world import host, jobs, schedule, submit, world

GROUPS = """\
type: service
port: 8000
env: [A=1]
replicas:
  - name: front
    count: 1
    commands: [serve-front]
  - name: py
    count: 1
    python: "3.9"
    nvcc: true
    commands: [serve-py]
  - name: img
    count: 1
    image: vllm/vllm:latest
    spot_policy: spot
    reservation: r-1
    commands: [serve-img]
  - name: dind
    count: 1
    docker: true
    commands: [compose-up]
  - name: priv
    count: 1
    privileged: true
    commands: [serve-priv]
"""


def _config(text: str) -> dict[str, Any]:
    config, _ = parse_config_located(text)
    return to_json(config)


def _spec(text: str) -> RunSpec:
    return compile_run(_config(text))


def test_each_group_compiles_its_own_environment_over_the_services() -> None:
    spec = _spec(GROUPS)
    front, py, img, dind, priv = (spec.for_group(g) for g in spec.group_names)
    # A group that sets nothing runs with the service's (here: a process job, no python).
    assert front is spec and front.image is None and front.python is None
    assert (py.image, py.python, py.nvcc) == (None, "3.9", True)
    assert (py.placement.python, py.placement.nvcc, py.placement.image) == ("3.9", True, False)
    assert img.image == "vllm/vllm:latest" and img.placement.image
    assert (img.placement.spot_policy, img.placement.reservation) == ("spot", "r-1")
    assert spec.placement.spot_policy == "on-demand"  # the service's own stays the default
    assert (dind.image, dind.privileged, dind.shell) == (DSTACK_DIND_IMAGE, True, "bash")
    assert spec.job_spec("dind").commands == (START_DOCKERD, "compose-up")
    assert spec.job_spec("img").commands == ("serve-img",)
    assert (priv.image, priv.privileged) == (DSTACK_BASE_IMAGE, True)
    # Everything else is the service's.
    assert py.env == spec.env == (("A", "1"),) and py.service == spec.service


def test_a_groups_environment_replaces_the_services_choice() -> None:
    """``image``, ``python`` and ``docker`` are one choice: a group's replaces the service's."""
    spec = _spec(
        "type: service\nport: 80\nimage: nginx\nreplicas:\n  - count: 1\n"
        "  - count: 1\n    python: '3.12'\n    commands: [s]\n"
    )
    assert spec.for_group("0").image == "nginx"
    one = spec.for_group("1")
    assert (one.image, one.python, one.placement.image) == (None, "3.12", False)


def test_a_plain_service_and_a_task_are_unchanged() -> None:
    spec = _spec("type: service\nport: 80\npython: '3.11'\ncommands: [s]\n")
    assert spec.for_group(None) is spec and spec.placement_of(None) is spec.placement
    spec = _spec(
        "type: task\npython: '3.11'\ngroups:\n  - name: a\n    commands: [x]\n"
        "  - name: b\n    commands: [y]\n"
    )
    assert spec.for_group("b") is spec and spec.placement_of("a").python == "3.11"


# --- the scheduler: each replica is placed by its group's placement ----------------------------


def _where(sm: StateMachine, run: str) -> dict[str | None, str]:
    """Each job's group -> its host, or why it waits."""
    return {
        j.group: (j.node_id if j.status is not JobStatus.SUBMITTED else f"waits: {j.why_pending}")
        for j in jobs(sm, run)
    }


SPOT_GROUPS = """\
type: service
port: 8000
replicas:
  - name: cheap
    count: 1
    spot_policy: spot
    commands: [s]
  - name: steady
    count: 1
    commands: [s]
"""


def test_a_groups_spot_policy_picks_its_hosts() -> None:
    # Two addresses: each replica, a process job, holds the service's port on its own.
    sm = world(
        host("od", 8, labels={"spot": "false"}).model_copy(update={"internal_ip": "10.0.0.1"}),
        host("sp", 8, labels={"spot": "true"}).model_copy(update={"internal_ip": "10.0.0.2"}),
        submit("svc", _config(SPOT_GROUPS)),
    )
    schedule(sm)
    assert _where(sm, "svc") == {"cheap": "sp", "steady": "od"}


def test_a_groups_spot_policy_says_why_its_replica_waits() -> None:
    sm = world(host("od", 8), submit("svc", _config(SPOT_GROUPS)))
    schedule(sm)
    got = _where(sm, "svc")
    assert got["steady"] == "od"
    assert "od is not a spot instance (spot_policy: spot)" in got["cheap"]


def test_a_group_with_an_image_needs_a_host_with_a_container_runtime() -> None:
    text = (
        "type: service\nport: 8000\nreplicas:\n  - name: proc\n    count: 1\n    commands: [s]\n"
        "  - name: box\n    count: 1\n    image: nginx\n"
    )
    sm = world(host("plain", 8), submit("svc", _config(text)))
    schedule(sm)
    got = _where(sm, "svc")
    assert got["proc"] == "plain"
    assert "plain has no container runtime (docker/podman) for image jobs" in got["box"]
    sm = world(
        host("plain", 8), host("dock", 8, runtime="/usr/bin/docker"), submit("svc", _config(text))
    )
    schedule(sm)
    assert _where(sm, "svc")["box"] == "dock"


def test_a_groups_python_filters_hosts() -> None:
    text = (
        "type: service\nport: 8000\nreplicas:\n  - name: old\n    count: 1\n"
        "    python: '3.9'\n    commands: [s]\n"
    )
    h = host("h1", 8).model_copy(update={"pythons": ["3.11"]})
    sm = world(h, submit("svc", _config(text)))
    schedule(sm)
    assert "h1 has no Python 3.9 (it has 3.11)" in _where(sm, "svc")["old"]


# --- the executor: each job launches with its group's environment -----------------------------


@pytest.fixture
async def runner(tmp_path: Path):  # type: ignore[no-untyped-def]
    r = ProcessRunner(tmp_path / "jobs", use_launcher=False)
    yield r
    await r.aclose()


async def test_each_job_launches_with_its_groups_environment(runner: ProcessRunner) -> None:
    from meshgpu.runner.toolchain import Toolchain
    from meshgpu.state import SubmitRun

    text = (
        "type: service\nport: 8000\nreplicas:\n  - name: py\n    count: 1\n    python: '3.9'\n"
        "    commands: [serve-py]\n  - name: img\n    count: 1\n    image: vllm/vllm:1\n"
        "    commands: [serve-img]\n"
    )
    sm = StateMachine()
    sm.apply_command(RegisterNode(at=1.0, node_id="n1", name="n1", cpu_count=8, memory_mib=8192))
    sm.apply_command(
        SubmitRun(at=2.0, request_id="r", run_id="id-s", run_name="s", config=_config(text))
    )
    by_group = {j.group: j for j in sm.run_jobs(sm.runs["s"])}
    sm.apply_command(
        AssignJobs(
            at=3.0,
            assignments=[
                Assignment(job_id=j.job_id, node_id="n1", gpu_indices=[]) for j in by_group.values()
            ],
        )
    )
    ex = Executor(
        "n1",
        sm,
        runner,
        propose=None,  # type: ignore[arg-type]
        code_dir=Path("/nonexistent"),
        gpu_vendor=lambda: None,
        container_runtime="/usr/bin/docker",
    )
    ex.toolchain = Toolchain(pythons={"3.9": "/opt/py39/bin/python3.9"})
    run = sm.runs["s"]
    py = ex._prepare(sm.jobs[by_group["py"].job_id], [], run.spec, 1)  # noqa: SLF001
    img = ex._prepare(sm.jobs[by_group["img"].job_id], [], run.spec, 1)  # noqa: SLF001
    # The python group: a process job whose prologue makes a venv with the host's 3.9.
    assert py.argv is None
    assert "/opt/py39/bin/python3.9" in py.commands[0] and py.commands[-1] == "serve-py"
    assert py.env["DSTACK_VENV_DIR"]
    # The image group: a container of its image, no venv.
    assert img.argv is not None and "vllm/vllm:1" in img.argv
    assert "DSTACK_VENV_DIR" not in img.env


# --- the support table: honoured, or refused where the mesh cannot run it ----------------------


def test_group_fields_are_honoured_and_need_a_runtime_only_for_containers() -> None:
    config, pos = parse_config_located(GROUPS, "g.yml")
    assert check_config(config, pos, None) == []
    assert check_config(config, pos, MeshCapabilities(container_runtime=True)) == []
    got = [str(i) for i in check_config(config, pos, MeshCapabilities(container_runtime=False))]
    assert [g.split(": ")[0] + ": " + g.split(": ")[1] for g in got] == [
        "g.yml:15:5: replicas[2].image",
        "g.yml:21:5: replicas[3].docker",
        "g.yml:25:5: replicas[4].privileged",
    ]
    assert "image (of a replica group) needs a container runtime; no member has one" in got[0]


def test_registry_auth_goes_with_a_groups_image() -> None:
    text = (
        "type: service\nport: 80\nregistry_auth: {username: u, password: p}\n"
        "replicas:\n  - count: 1\n    image: private/x\n"
    )
    config, pos = parse_config_located(text, "g.yml")
    got = [i.path for i in check_config(config, pos, MeshCapabilities(container_runtime=False))]
    assert got == ["registry_auth", "replicas[0].image"]
    assert parse_config(text) is not None


def test_the_plan_shows_each_groups_own_environment() -> None:
    from meshgpu.config.render import plan_lines

    rows = dict(plan_lines(parse_config(GROUPS)))
    assert rows["replicas py"].endswith(", python 3.9, nvcc")
    assert rows["replicas img"].endswith(", vllm/vllm:latest, spot policy spot, reservation r-1")
    assert rows["replicas dind"].endswith(", docker-in-docker")
    assert rows["replicas front"] == "1, " + rows["replicas front"].split(", ", 1)[1]
