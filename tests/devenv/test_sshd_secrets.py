"""SSH sessions into a job see its secret variables, which no file on the host holds: the SSH
server asks the agent for them (on the trio loop) when a session opens; when they cannot be had
the session still opens and says so."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from tests.devenv._sshd import needs_openssh, sshd

pytestmark = needs_openssh
SECRET = "hf_ssh-Secret-5b0e7d2a94"


def name_secret(env_job_json: Path) -> None:
    """The job's record as the runner writes it for a job with a secret variable: its name."""
    record = json.loads(env_job_json.read_text())
    env_job_json.write_text(json.dumps(record | {"secret_env": ["HF_TOKEN"]}))


async def test_a_session_sees_the_jobs_secret_variable(tmp_path: Path) -> None:
    asked: list[str] = []

    async def lookup(job_id: str) -> dict[str, str]:
        trio.lowlevel.current_task()  # on the trio loop (raises anywhere else)
        await trio.sleep(0)
        asked.append(job_id)
        return {"HF_TOKEN": SECRET}

    async with sshd(tmp_path, secret_env=lookup) as env:
        name_secret(tmp_path / "jobs" / env.job_id / "job.json")
        r = await env.ssh('printf %s "$HF_TOKEN"; echo; echo $MESHGPU_RUN_NAME')
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().split() == [SECRET, "dev"] and r.stderr == b""
        assert asked == [env.job_id]


async def test_a_session_without_them_says_so(tmp_path: Path) -> None:
    async def lookup(job_id: str) -> dict[str, str]:
        raise RuntimeError("no voter could give this job its secrets: timed out")

    async with sshd(tmp_path, secret_env=lookup) as env:
        name_secret(tmp_path / "jobs" / env.job_id / "job.json")
        r = await env.ssh('echo "[$HF_TOKEN]"')
        assert (r.returncode, r.stdout) == (0, b"[]\n"), r.stderr
        assert b"secret variables (HF_TOKEN) are unavailable in this session" in r.stderr
        assert b"no voter could give" in r.stderr


async def test_a_job_without_secret_variables_asks_for_none(tmp_path: Path) -> None:
    async def lookup(job_id: str) -> dict[str, str]:
        raise AssertionError("asked although the job names no secret variable")

    async with sshd(tmp_path, secret_env=lookup) as env:
        r = await env.ssh("echo $MESHGPU_RUN_NAME")
        assert (r.returncode, r.stdout, r.stderr) == (0, b"dev\n", b"")
