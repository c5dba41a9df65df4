"""The process runner with real processes: env, exit codes, stop/abort, max_duration, log cap,
and re-adoption after the agent process is SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from meshgpu.runner import (
    ClusterInfo,
    JobEnvInputs,
    JobIdentity,
    JobLaunch,
    ProcessRunner,
    job_environment,
    join_commands,
)

BASE = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


@pytest.fixture
async def make_runner() -> AsyncIterator[Callable[..., ProcessRunner]]:
    made: list[ProcessRunner] = []

    def make(path: Path, use_launcher: bool = True) -> ProcessRunner:
        made.append(ProcessRunner(path, use_launcher=use_launcher))
        return made[-1]

    yield make
    for r in made:
        await r.aclose()


def launch(
    job_id: str, commands: list[str], env: dict[str, str] | None = None, **kw: object
) -> JobLaunch:
    return JobLaunch(job_id=job_id, commands=tuple(commands), env=env or dict(BASE), **kw)  # type: ignore[arg-type]


def test_job_environment_names_and_gpu_pinning() -> None:
    inputs = JobEnvInputs(
        identity=JobIdentity("train", "run-uuid", "job-uuid"),
        cluster=ClusterInfo(node_rank=1, nodes_ips=("10.0.0.1", "10.0.0.2"), gpus_per_node=(4, 2)),
        gpu_indices=(2, 3),
        gpu_vendor="nvidia",
        working_dir="/w",
        hostfile_path="/h",
    )
    env = job_environment(
        inputs, {"DSTACK_NODE_RANK": "user-wins", "X": "1"}, base={"CUDA_VISIBLE_DEVICES": "0"}
    )
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and "HIP_VISIBLE_DEVICES" not in env
    assert env["MESHGPU_NODE_RANK"] == "1" and env["DSTACK_NODE_RANK"] == "user-wins"
    assert env["MESHGPU_NODES_IPS"] == env["DSTACK_NODES_IPS"] == "10.0.0.1\n10.0.0.2"
    assert env["MESHGPU_MASTER_NODE_IP"] == "10.0.0.1"
    assert (env["MESHGPU_GPUS_PER_NODE"], env["MESHGPU_GPUS_NUM"]) == ("2", "6")
    assert inputs.cluster.hostfile() == "10.0.0.1 slots=4\n10.0.0.2 slots=2\n"
    amd = job_environment(
        JobEnvInputs(JobIdentity("r", "i", "j"), gpu_indices=(0,), gpu_vendor="amd"), {}
    )
    assert amd["HIP_VISIBLE_DEVICES"] == amd["ROCR_VISIBLE_DEVICES"] == "0"
    cpu = job_environment(
        JobEnvInputs(JobIdentity("r", "i", "j")), {}, base={"CUDA_VISIBLE_DEVICES": "0,1"}
    )
    assert cpu["CUDA_VISIBLE_DEVICES"] == ""


def test_join_like_dstack() -> None:
    assert (
        join_commands(["a", "python -m http.server &", "b"])
        == "a && { python -m http.server & } && b"
    )


async def test_runs_job_and_records_output(
    tmp_path: Path, make_runner: Callable[..., ProcessRunner]
) -> None:
    r = make_runner(tmp_path)
    work = r.prepare("j1")
    (work / "code.txt").write_text("user code")
    env = {"GREETING": "hi"}
    await r.start(
        launch("j1", ["echo $GREETING from $(pwd)", "cat code.txt", "echo err >&2"], env=BASE | env)
    )
    with trio.fail_after(20):
        res = await r.wait("j1")
    assert (res.exit_code, res.reason) == (0, "done_by_runner")
    out = r.log_path("j1").read_text()
    assert f"hi from {work}" in out and "user code" in out and "err" in out
    assert res.started_at is not None and res.finished_at >= res.started_at


async def test_failure_exit_code_without_launcher(
    tmp_path: Path, make_runner: Callable[..., ProcessRunner]
) -> None:
    r = make_runner(tmp_path, use_launcher=False)
    await r.start(launch("j", ["echo before", "exit 3", "echo never"]))
    with trio.fail_after(20):
        res = await r.wait("j")
    assert (res.exit_code, res.reason) == (3, "container_exited_with_error")
    assert "never" not in r.log_path("j").read_text()


async def test_graceful_stop_then_kill_and_abort(
    tmp_path: Path, make_runner: Callable[..., ProcessRunner]
) -> None:
    r = make_runner(tmp_path)
    polite = "trap 'echo bye; exit 0' TERM; echo ready; while true; do sleep 0.05; done"
    stubborn = "trap '' TERM; echo ready; while true; do sleep 0.05; done"
    await r.start(launch("polite", [polite], shell="/bin/bash"))
    await r.start(launch("stubborn", [stubborn], shell="/bin/bash"))
    await r.start(launch("abort", ["sleep 30"]))
    with trio.fail_after(20):
        for j in ("polite", "stubborn"):
            while "ready" not in (r.log_path(j).read_text() if r.log_path(j).exists() else ""):
                await trio.sleep(0.02)
        assert r.stop("polite", grace_s=5)
        assert r.stop("stubborn", grace_s=0.5)
        assert r.stop("abort", grace_s=0, reason="aborted_by_user")
        polite_res, stubborn_res, abort_res = [
            await r.wait(j) for j in ("polite", "stubborn", "abort")
        ]
    assert (polite_res.reason, polite_res.exit_code) == ("terminated_by_user", 0)
    assert "bye" in r.log_path("polite").read_text()
    assert (stubborn_res.reason, stubborn_res.signal) == ("terminated_by_user", signal.SIGKILL)
    assert (abort_res.reason, abort_res.signal) == ("aborted_by_user", signal.SIGKILL)
    assert not r.stop("abort", grace_s=0)


async def test_max_duration_and_background_children(
    tmp_path: Path, make_runner: Callable[..., ProcessRunner]
) -> None:
    r = make_runner(tmp_path)
    await r.start(launch("slow", ["sleep 30"], max_duration_s=1, stop_grace_s=1))
    await r.start(launch("bg", ["sleep 300 &", "echo $! > bg.pid", "echo main done"]))
    with trio.fail_after(20):
        slow = await r.wait("slow")
        bg = await r.wait("bg")
    assert slow.reason == "max_duration_exceeded" and slow.finished_at - slow.started_at < 10
    assert bg.reason == "done_by_runner"
    pid = int((r.work_dir("bg") / "bg.pid").read_text())
    with trio.fail_after(5):
        while (
            Path(f"/proc/{pid}").exists()
            and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
        ):
            await trio.sleep(0.02)  # the background child went down with its job


async def test_log_cap(tmp_path: Path, make_runner: Callable[..., ProcessRunner]) -> None:
    r = make_runner(tmp_path)
    await r.start(
        launch("loud", ["head -c 200000 /dev/zero | tr '\\0' x", "echo end"], log_cap_bytes=10_000)
    )
    with trio.fail_after(20):
        res = await r.wait("loud")
    assert res.reason == "done_by_runner" and res.log_truncated
    data = r.log_path("loud").read_bytes()
    assert (
        data.startswith(b"x" * 10_000)
        and b"output truncated at 10000 bytes" in data
        and len(data) < 10_100
    )


AGENT = textwrap.dedent(
    """
    import sys, os, trio
    from meshgpu.runner import JobLaunch, ProcessRunner

    async def main():
        r = ProcessRunner(sys.argv[1])
        await r.start(JobLaunch("survivor", ("echo started", "sleep 1.5", "echo finished", "exit 7"),
                                {"PATH": os.environ["PATH"]}))
        await r.start(JobLaunch("quick", ("echo quick",), {"PATH": os.environ["PATH"]}))
        print("launched", flush=True)
        await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_agent_sigkill_then_restart_readopts_jobs(
    tmp_path: Path, make_runner: Callable[..., ProcessRunner]
) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert agent.stdout is not None and agent.stdout.readline().strip() == "launched"
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    agent.stdout.close()
    # A new agent process on the same data dir.
    r = make_runner(tmp_path)
    assert r.adopt() == ["quick", "survivor"]
    assert r.result("survivor") is None, "the job died with the agent"
    with trio.fail_after(20):
        survivor = await r.wait("survivor")
        quick = await r.wait("quick")
    assert (survivor.exit_code, survivor.reason) == (7, "container_exited_with_error")
    assert r.log_path("survivor").read_text() == "started\nfinished\n"
    assert quick.reason == "done_by_runner"
    r.mark_reported("quick")
    assert r.adopt() == ["survivor"]


async def test_supervisor_killed_is_reported_not_forgotten(
    tmp_path: Path, make_runner: Callable[..., ProcessRunner]
) -> None:
    r = make_runner(tmp_path)
    await r.start(launch("victim", ["sleep 30"]))
    info = (tmp_path / "victim" / "shim.pid").read_text()
    with trio.fail_after(10):
        while not (tmp_path / "victim" / "job.pid").exists():
            await trio.sleep(0.01)
    os.kill(json.loads(info)["pid"], signal.SIGKILL)
    with trio.fail_after(10):
        res = await r.wait("victim")
    assert res.reason == "executor_error" and "vanished" in res.message
    job_pid = json.loads((tmp_path / "victim" / "job.pid").read_text())["pgid"]
    os.killpg(job_pid, signal.SIGKILL)


def test_container_command_line() -> None:
    from meshgpu.runner.container import container_argv, detect_runtime

    argv = container_argv(
        "/usr/bin/docker",
        job_id="j1",
        image="nvcr.io/nvidia/pytorch:24.01",
        commands=["nvidia-smi", "python t.py"],
        env={"PATH": "/host/bin", "MESHGPU_NODE_RANK": "0", "HF_TOKEN": "x"},
        work_dir="/data/jobs/j1/work",
        gpu_indices=[2, 3],
        gpu_vendor="nvidia",
        shm_size_gb=16,
        privileged=True,
    )
    assert argv[:2] == ["/usr/bin/docker", "run"] and "--rm" in argv and "--init" in argv
    assert argv[argv.index("--gpus") + 1] == '"device=2,3"'
    assert argv[argv.index("-v") + 1] == "/data/jobs/j1/work:/workflow"
    assert "MESHGPU_NODE_RANK=0" in argv and "HF_TOKEN=x" in argv and "PATH=/host/bin" not in argv
    assert argv[argv.index("--shm-size") + 1] == "16384m" and "--privileged" in argv
    assert argv[-4:] == [
        "nvcr.io/nvidia/pytorch:24.01",
        "/bin/sh",
        "-c",
        "nvidia-smi && python t.py",
    ]
    podman = container_argv(
        "podman",
        job_id="j",
        image="i",
        commands=[],
        env={},
        work_dir="/w",
        gpu_indices=[0],
        gpu_vendor="nvidia",
    )
    assert podman[podman.index("--device") + 1] == "nvidia.com/gpu=0" and podman[-1] == "i"
    # A client without a working engine (as on the CI machines) must not count as a runtime.
    import shutil
    import subprocess

    docker = shutil.which("docker")
    engine = (
        docker is not None
        and subprocess.run([docker, "info"], capture_output=True, timeout=10).returncode == 0
    )
    found = detect_runtime(timeout=10)
    assert (found is not None) == engine or (found and found.endswith("podman"))


async def test_explicit_argv_replaces_the_shell(
    tmp_path: Path, make_runner: Callable[..., ProcessRunner]
) -> None:
    r = make_runner(tmp_path)
    await r.start(
        JobLaunch("argv", ("ignored",), dict(BASE), argv=("/bin/echo", "direct", "$NOT_EXPANDED"))
    )
    with trio.fail_after(20):
        res = await r.wait("argv")
    assert (
        res.reason == "done_by_runner"
        and r.log_path("argv").read_text() == "direct $NOT_EXPANDED\n"
    )


async def test_a_stop_while_the_supervisor_is_being_launched_is_not_lost(tmp_path: Path) -> None:
    """Between the job's record being written and its supervisor's pid being known, a stop
    must still reach the job (else a fenced job could run on as a copy)."""
    r = ProcessRunner(tmp_path / "jobs", use_launcher=True)
    try:
        r.prepare("j1")
        launch = JobLaunch(job_id="j1", commands=("sleep 3",), env={"PATH": "/usr/bin:/bin"})
        async with trio.open_nursery() as n:
            n.start_soon(r.start, launch)
            while not (r.job_dir("j1") / "job.json").exists():
                await trio.sleep(0)
            assert r.stop("j1", grace_s=0.0, reason="terminated_by_server")
        with trio.fail_after(20):
            res = await r.wait("j1")
        assert res.reason != "done_by_runner", res
    finally:
        await r.aclose()


async def test_a_repeated_launch_never_runs_the_job_twice(tmp_path: Path) -> None:
    """A launch request repeated after a lost answer (the fork server's connection broke)
    starts a second supervisor for the same job dir: one of the two takes the job's lock and runs
    it, the other leaves without running it, and shim.pid names the one that ran."""
    r = ProcessRunner(tmp_path / "jobs", use_launcher=True)
    marks = tmp_path / "marks"
    try:
        r.prepare("j1")
        launch = JobLaunch(
            job_id="j1",
            commands=(f"echo ran >> {marks}", "sleep 0.5"),
            env={"PATH": "/usr/bin:/bin"},
        )
        await r.start(launch)
        first = json.loads((r.job_dir("j1") / "shim.pid").read_text())["pid"]
        again = await r._launch_via_launcher(r.job_dir("j1"))  # the repeated request
        assert again is not None and again != first
        with trio.fail_after(20):
            res = await r.wait("j1")
        assert res.reason == "done_by_runner", res
        # Whichever supervisor took the job's lock ran it (the first, unless the machine
        # scheduled the repeat before it), and the file names that one: the job ran once.
        assert json.loads((r.job_dir("j1") / "shim.pid").read_text())["pid"] in (first, again)
        assert marks.read_text() == "ran\n"
    finally:
        await r.aclose()


def test_a_service_replica_gets_its_number_and_port() -> None:
    inputs = JobEnvInputs(JobIdentity("web", "i", "j"), replica_num=3, service_port=8000)
    env = job_environment(inputs, {})
    assert env["MESHGPU_REPLICA_NUM"] == env["DSTACK_REPLICA_NUM"] == "3"
    assert env["MESHGPU_SERVICE_PORT"] == "8000"
    task = job_environment(JobEnvInputs(JobIdentity("t", "i", "j")), {})
    assert "MESHGPU_REPLICA_NUM" not in task and "MESHGPU_SERVICE_PORT" not in task
