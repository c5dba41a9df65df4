"""An SSH session (the real OpenSSH client, the in-process server) in a sandboxed process job
with its own PID namespace: it sees the job's processes and nothing else, as the job's user.
Root (CI runs it as root); the job user, cgroups and workspace made here are removed."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio

from meshgpu.runner import JobLaunch, ProcessRunner
from meshgpu.runner.confine import Confinement, ensure_user
from tests.devenv._sshd import needs_openssh, run, sshd

pytestmark = [
    needs_openssh,
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root (CI runs it as root)"),
]
USER = "mgtest-ssh"


async def test_a_session_sees_only_the_jobs_processes(tmp_path: Path) -> None:
    made = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        ensure_user(USER)
        made = True
    ws = Path(tempfile.mkdtemp(prefix="meshgpu-ws-", dir="/tmp"))
    os.chmod(ws, 0o711)
    try:
        conf = Confinement(USER)
        if not conf.pid_ns:
            pytest.skip("this host refuses a PID namespace to jobs")
        async with sshd(tmp_path) as env:
            # The job behind the run: a real one in its sandbox, in place of the fixture's record.
            (tmp_path / "jobs" / env.job_id / "job.json").unlink()
            runner = ProcessRunner(tmp_path / "jobs", workspace_dir=ws)
            box = conf.for_job(
                env.job_id,
                resources={},
                share=None,
                user=None,
                volumes=(),
                shm_size_gb=None,
                gpu_indices=(),
                workspace=runner.work_dir(env.job_id),
            )
            await runner.start(
                JobLaunch(
                    job_id=env.job_id,
                    commands=("exec sleep 60",),
                    env={"PATH": "/usr/bin:/bin"} | box.env,
                    sandbox=box.spec,
                )
            )
            try:
                pid_file = runner.job_dir(env.job_id) / "job.pid"
                with trio.fail_after(10):
                    while not pid_file.exists():
                        await trio.sleep(0.01)
                init = json.loads(pid_file.read_text())["pid"]
                r = await env.ssh(
                    f"ps -e -o pid=,user:20=,comm=; id -un; kill -0 {init} {os.getpid()}"
                )
                out = r.stdout.decode().splitlines()
                assert out[-1] == USER, r
                procs = [line.split() for line in out[:-1]]
                assert procs[0] == ["1", USER, "meshgpu-init"], out
                assert [p[2] for p in procs[1:]] in (["sleep", s, "ps"] for s in ("sh", "bash")), (
                    out
                )
                assert {p[1] for p in procs} == {USER}
                assert b"No such process" in r.stderr and r.returncode == 1, r
                r = await env.ssh("echo $$")
                assert r.stdout.strip().isdigit() and int(r.stdout) < 10, r
                # with a terminal too (the PTY is the session's, through the fork)
                argv = ["ssh", *env.ssh_opts(), "-tt", "-p", str(env.port), "dev@127.0.0.1"]
                r = await run([*argv, "tty; echo $$; exit 4"])
                lines = r.stdout.decode().split()
                assert lines[0].startswith("/dev/pts/") and int(lines[1]) < 10, r
                assert r.returncode == 4
            finally:
                runner.stop(env.job_id, 0)
                with trio.fail_after(10):
                    await runner.wait(env.job_id)
                await runner.aclose()
    finally:
        shutil.rmtree(ws, ignore_errors=True)
        if made:
            subprocess.run(["userdel", USER], check=False, capture_output=True)
