"""An ``image:`` job's repo and files are placed inside its container: the same prologue, with
the container's paths (the workspace at ``/workflow``, the code staged inside it), as the first
of its commands; ``DSTACK_WORKING_DIR``/``DSTACK_REPO_DIR`` name the container's directories.
(No container engine runs here: the command line is what is checked.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshgpu.config import parse_config
from meshgpu.config.render import to_json
from meshgpu.runner import ProcessRunner
from meshgpu.runner.executor import Executor
from meshgpu.state import AssignJobs, Assignment, CodeRef, RegisterNode, StateMachine, SubmitRun

IMAGE_TASK = """\
type: task
image: ubuntu:24.04
working_dir: /app
repos:
  - local_path: .
    path: src
files: ["conf.yml:/etc/app/conf.yml"]
commands: [ls src]
"""


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[ProcessRunner]:
    r = ProcessRunner(tmp_path / "jobs", use_launcher=False)
    yield r
    await r.aclose()


def _launch(runner: ProcessRunner, text: str):  # type: ignore[no-untyped-def]
    sm = StateMachine()
    sm.apply_command(RegisterNode(at=1.0, node_id="n1", name="n1", cpu_count=8, memory_mib=8192))
    code = CodeRef(sha256="0" * 64, size=1, node_id="n1")
    sm.apply_command(
        SubmitRun(
            at=2.0,
            request_id="r",
            run_id="id-img",
            run_name="img",
            config=to_json(parse_config(text)),
            code=code,
        )
    )
    job = sm.run_jobs(sm.runs["img"])[0]
    sm.apply_command(
        AssignJobs(
            at=3.0, assignments=[Assignment(job_id=job.job_id, node_id="n1", gpu_indices=[])]
        )
    )
    job = sm.jobs[job.job_id]
    ex = Executor(
        "n1",
        sm,
        runner,
        propose=None,  # type: ignore[arg-type]
        code_dir=Path("/nonexistent"),
        gpu_vendor=lambda: None,
        container_runtime="/usr/bin/docker",
    )
    run = sm.runs["img"]
    return ex, job, ex._prepare(job, run.run_args, run.spec, job.epoch)


async def test_an_image_jobs_repo_and_files_are_placed_in_its_container(
    runner: ProcessRunner,
) -> None:
    ex, job, launch = _launch(runner, IMAGE_TASK)
    assert launch.argv is not None
    script = launch.argv[-1]
    assert "_mg_move_into /workflow/.meshgpu/code /app/src" in script
    assert "_mg_put /workflow/.meshgpu/code/.meshgpu/files/0 /etc/app/conf.yml" in script
    assert script.endswith("&& ls src")
    assert launch.env["DSTACK_WORKING_DIR"] == "/app"
    assert launch.env["DSTACK_REPO_DIR"] == "/app/src"
    assert "DSTACK_VENV_DIR" not in launch.env
    # The archive is unpacked where the container finds it: inside the mounted workspace.
    place = ex._layout(job.job_id, ex.state.runs["img"].spec)
    assert place.host_code_root == str(runner.work_dir(job.job_id) / ".meshgpu" / "code")


async def test_an_image_job_without_repo_or_files_is_unchanged(runner: ProcessRunner) -> None:
    _, _, launch = _launch(runner, "type: task\nimage: ubuntu\nworking_dir: /app\ncommands: [ls]\n")
    assert launch.argv is not None and launch.argv[-1] == "ls"
    assert launch.env["DSTACK_WORKING_DIR"] == "/app"
