"""A job's secret values reach its supervisor in memory, never on disk: ``job.json`` names the
variables only, the job sees them (through the fork server and when started directly), they are
masked in its log, a restarted agent's runner needs none of them, and the bounds on the way are
said plainly."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

import tests.runner.test_executor as tx  # its state helpers (a module: not collected twice)
from meshgpu.runner import JobLaunch, ProcessRunner
from meshgpu.runner.container import container_argv
from meshgpu.runner.executor import Executor
from meshgpu.runner.process import LAUNCHER_SOCK, MAX_SECRETS_BYTES

BASE = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
SECRET = "hf_unit-Secret-3e9a61f0c2"
DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()
PRINT = [
    'echo "hash=$(printf %s "$HF_TOKEN" | sha256sum | cut -c1-64)"',
    'echo "value=$HF_TOKEN"',
]


@pytest.fixture
async def make_runner() -> AsyncIterator[Callable[..., ProcessRunner]]:
    made: list[ProcessRunner] = []

    def make(path: Path, use_launcher: bool = True, **kw: object) -> ProcessRunner:
        made.append(ProcessRunner(path, use_launcher=use_launcher, **kw))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for r in made:
        await r.aclose()


def secret_launch(job_id: str, commands: list[str]) -> JobLaunch:
    return JobLaunch(
        job_id=job_id,
        commands=tuple(commands),
        env=dict(BASE),
        secret_env={"HF_TOKEN": SECRET},
        mask=(SECRET,),
    )


def assert_nowhere(*roots: Path) -> None:
    """The secret's bytes in no file under ``roots`` (sockets and the like skipped)."""
    seen = 0
    for root in roots:
        for f in root.rglob("*"):
            if f.is_file():
                seen += 1
                assert SECRET.encode() not in f.read_bytes(), f
    assert seen > 0


@pytest.mark.parametrize("use_launcher", [True, False], ids=["launcher", "direct"])
async def test_the_job_sees_its_secret_that_no_file_holds(
    tmp_path: Path, make_runner: Callable[..., ProcessRunner], use_launcher: bool
) -> None:
    jobs, work = tmp_path / "jobs", tmp_path / "work"
    r = make_runner(jobs, use_launcher=use_launcher, workspace_dir=work)
    r.prepare("j1")
    await r.start(secret_launch("j1", PRINT))
    with trio.fail_after(20):
        res = await r.wait("j1")
    assert res.reason == "done_by_runner", (res, (jobs / "j1" / "shim.err").read_text())
    record = json.loads((jobs / "j1" / "job.json").read_text())
    assert record["secret_env"] == ["HF_TOKEN"] and record["secrets_in_memory"] is True
    assert "HF_TOKEN" not in record["env"] and "mask" not in record
    out = r.log_path("j1").read_text()
    assert f"hash={DIGEST}" in out  # the job had the value ...
    assert "value=***" in out and SECRET not in out  # ... masked in its log
    assert_nowhere(jobs, work)  # record, log, status, shim.err, workspace


async def test_a_restarted_runner_re_adopts_without_the_secrets(
    tmp_path: Path, make_runner: Callable[..., ProcessRunner]
) -> None:
    jobs = tmp_path / "jobs"
    gate = tmp_path / "gate"
    first = make_runner(jobs)
    first.prepare("j1")
    wait = f"while [ ! -e {gate} ]; do sleep 0.02; done"
    await first.start(secret_launch("j1", [wait, *PRINT]))
    with trio.fail_after(10):
        while not (jobs / "j1" / "job.pid").exists():
            await trio.sleep(0.02)
    await first.aclose(stop_launcher=False)  # the agent goes; its supervisors stay
    again = make_runner(jobs)  # a new agent process: nothing in memory
    assert again.adopt() == ["j1"]
    gate.touch()
    with trio.fail_after(20):
        res = await again.wait("j1")
    assert res.reason == "done_by_runner"
    out = again.log_path("j1").read_text()
    assert f"hash={DIGEST}" in out and "value=***" in out
    assert_nowhere(jobs)


async def test_a_job_without_secrets_reads_nothing_on_the_way(
    tmp_path: Path, make_runner: Callable[..., ProcessRunner]
) -> None:
    r = make_runner(tmp_path / "jobs", use_launcher=False)
    r.prepare("j1")
    await r.start(JobLaunch(job_id="j1", commands=("echo plain",), env=dict(BASE)))
    with trio.fail_after(20):
        res = await r.wait("j1")
    assert res.reason == "done_by_runner" and r.log_path("j1").read_text() == "plain\n"
    record = json.loads((tmp_path / "jobs" / "j1" / "job.json").read_text())
    assert record["secret_env"] == [] and record["secrets_in_memory"] is False


async def test_too_many_secrets_are_refused_saying_what_to_do(
    tmp_path: Path, make_runner: Callable[..., ProcessRunner]
) -> None:
    r = make_runner(tmp_path / "jobs")
    r.prepare("j1")
    big = JobLaunch(
        job_id="j1", commands=("true",), env=dict(BASE), secret_env={"X": "y" * MAX_SECRETS_BYTES}
    )
    with pytest.raises(ValueError, match="reference fewer or smaller secrets"):
        await r.start(big)
    assert not (tmp_path / "jobs" / "j1" / "job.json").exists()


async def test_a_supervisor_whose_secrets_never_came_fails_the_job_clearly(
    tmp_path: Path, make_runner: Callable[..., ProcessRunner]
) -> None:
    # The fork server is asked in the old form (a bare directory) for a job whose record says
    # its secrets come in memory: the supervisor refuses to run it without them.
    jobs = tmp_path / "jobs"
    r = make_runner(jobs)
    r.prepare("j0")
    await r.start(JobLaunch(job_id="j0", commands=("true",), env=dict(BASE)))  # starts the server
    await r.aclose(stop_launcher=False)  # it serves one connection at a time: ours next
    d = jobs / "j1"
    r.prepare("j1")
    record = {"job_id": "j1", "argv": ["/bin/true"], "env": BASE, "cwd": str(d / "work")}
    (d / "job.json").write_text(json.dumps(record | {"secrets_in_memory": True}))
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(jobs / LAUNCHER_SOCK))
        s.sendall(str(d).encode() + b"\n")
        assert "pid" in json.loads(s.makefile().readline())
    with trio.fail_after(20):
        res = await r.wait("j1")
    assert res.reason == "executor_error"
    assert res.message == "the job's secrets did not reach its supervisor"


async def test_the_fork_server_bounds_and_checks_its_requests(
    tmp_path: Path, make_runner: Callable[..., ProcessRunner]
) -> None:
    jobs = tmp_path / "jobs"
    r = make_runner(jobs)
    r.prepare("j0")
    await r.start(JobLaunch(job_id="j0", commands=("true",), env=dict(BASE)))
    await r.aclose(stop_launcher=False)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(jobs / LAUNCHER_SOCK))
        f = s.makefile("rb")
        s.sendall(b'{"secrets": {}}\n')
        assert "job directory" in json.loads(f.readline())["error"]
        s.sendall(b'{"dir": "/nowhere", "secrets": []}\n')
        assert "must be an object" in json.loads(f.readline())["error"]
        # No end of line, ever: one byte over the bound (all of it read, so the answer is not
        # lost to a reset).
        s.sendall(b"{" + b" " * (MAX_SECRETS_BYTES + 8192))
        assert "a request is at most" in json.loads(f.readline())["error"]
        assert f.readline() == b""  # and the connection is closed


def test_image_jobs_take_secret_values_from_the_runtimes_environment() -> None:
    argv = container_argv(
        "/usr/bin/docker",
        job_id="j1",
        image="alpine",
        commands=["env"],
        env={"PLAIN": "1"},
        work_dir="/w",
        pass_env=["HF_TOKEN"],
    )
    i = argv.index("HF_TOKEN")
    assert argv[i - 1] == "-e" and "PLAIN=1" in argv and not any(SECRET in a for a in argv)


SECRET_TASK = """\
type: task
env:
  - HF_TOKEN=${{ secrets.hf }}
  - PLAIN=x
commands:
  - sleep 1
resources: {gpu: 1}
"""


def _executor(sm: object, runner: ProcessRunner, node_id: str) -> Executor:
    return Executor(
        node_id, sm, runner, propose=None, code_dir=Path("/nonexistent"), gpu_vendor=lambda: None
    )  # type: ignore[arg-type]


async def test_the_executor_keeps_secret_variables_apart_and_refetches_them_for_sessions(
    tmp_path: Path,
) -> None:
    sm = tx._state()
    (job,) = tx._submit(sm, "hf", SECRET_TASK)
    tx._assign(sm, [(job, "n1", [0])])
    job = sm.jobs[job.job_id]
    runner = ProcessRunner(tmp_path / "jobs", use_launcher=False)
    ex = _executor(sm, runner, "n1")
    run = sm.runs["hf"]
    launch = ex._prepare(job, run.run_args, run.spec, job.epoch, {"hf": SECRET})
    assert launch.secret_env == {"HF_TOKEN": SECRET} and launch.mask == (SECRET,)
    assert "HF_TOKEN" not in launch.env and launch.env["PLAIN"] == "x"

    # A restarted agent (nothing in memory) re-adopted the job: a session's lookup asks a
    # voter once (the peer call: here a function that counts), then keeps the answer.
    again = _executor(sm, runner, "n1")
    with pytest.raises(RuntimeError, match="does not run on this host"):
        await again.session_secrets(job.job_id)
    again.local[job.job_id] = job.epoch
    with pytest.raises(RuntimeError, match="cannot fetch secrets"):
        await again.session_secrets(job.job_id)
    asked: list[str] = []

    async def fetch(job_id: str) -> dict[str, str]:
        asked.append(job_id)
        return {"hf": SECRET}

    again.secrets = fetch
    assert await again.session_secrets(job.job_id) == {"HF_TOKEN": SECRET}
    assert await again.session_secrets(job.job_id) == {"HF_TOKEN": SECRET}
    assert asked == [job.job_id]
