"""The SSH server in-process over a plain state machine (a run ``dev`` whose job 0 runs on this
host, ``n0``), and the real OpenSSH client against it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from meshgpu.devenv.sessions import SessionTracker
from meshgpu.devenv.sshd import SSHServer
from meshgpu.scheduler import plan
from meshgpu.security.sshkeys import load_or_create_host_key, parse_public_key
from meshgpu.state import JobFinished, JobTerminationReason, StateMachine
from meshgpu.state.cluster import AddSSHKey, ClusterState
from tests.scheduler._world import apply_plan, host, jobs, submit, task, world

needs_openssh = pytest.mark.skipif(
    shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
    reason="the OpenSSH client is not installed (scripts/test installs openssh-client)",
)


def keygen(path: Path) -> str:
    """A new Ed25519 key pair at ``path``; the public key line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test@meshgpu", "-f", str(path)],
        check=True,
    )
    return path.with_suffix(".pub").read_text()


@dataclass
class Env:
    tmp: Path
    state: StateMachine
    cluster: ClusterState
    sessions: SessionTracker
    server: SSHServer
    key: Path  # the registered private key
    known_hosts: Path
    job_id: str
    work: Path

    @property
    def port(self) -> int:
        return self.server.port

    def ssh_opts(self, key: Path | None = None) -> list[str]:
        return [
            "-F", "/dev/null",
            "-i", str(key or self.key),
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip

    def ssh_argv(self, user: str = "dev", *args: str, key: Path | None = None) -> list[str]:
        return ["ssh", *self.ssh_opts(key), "-p", str(self.port), f"{user}@127.0.0.1", *args]

    async def ssh(
        self, *args: str, user: str = "dev", key: Path | None = None, stdin: bytes = b"",
        timeout: float = 20,
    ) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
        return await run(self.ssh_argv(user, *args, key=key), stdin=stdin, timeout=timeout)

    def end_job(self) -> None:
        job = self.state.jobs[self.job_id]
        self.state.apply_command(
            JobFinished(
                at=9, job_id=job.job_id, epoch=job.epoch, reason=JobTerminationReason.DONE_BY_RUNNER
            )
        )
        self.server.notify()


async def run(
    argv: Sequence[str], stdin: bytes = b"", timeout: float = 20, **kw: object
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(
            list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False, **kw
        )


def make_state(tmp: Path) -> tuple[StateMachine, str, Path]:
    """A run ``dev`` (one job, running on ``n0``) with its job dir as the executor makes it."""
    sm = world(host("n0"), submit("dev", task(None) | {"commands": ["sleep infinity"]}, at=1))
    apply_plan(sm, plan(sm, now=1), at=1)
    job = jobs(sm, "dev")[0]
    d = tmp / "jobs" / job.job_id
    work = d / "work"
    work.mkdir(parents=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "MESHGPU_RUN_NAME": "dev",
        "DSTACK_RUN_NAME": "dev",
        "MESHGPU_JOB_ID": job.job_id,
    }
    record = {"job_id": job.job_id, "commands": ["sleep infinity"], "env": env, "cwd": str(work)}
    (d / "job.json").write_text(json.dumps(record))
    return sm, job.job_id, work


@asynccontextmanager
async def sshd(tmp: Path, **kw: object) -> AsyncIterator[Env]:
    sm, job_id, work = make_state(tmp)
    cluster = ClusterState()
    key = tmp / "id_ed25519"
    pub = parse_public_key(keygen(key))
    cluster.apply_cmd(
        AddSSHKey(at=1, fingerprint=pub.fingerprint, public_key=pub.openssh, name="t")
    )
    host_key, host_pub = load_or_create_host_key(tmp / "ssh_host_ed25519_key")
    sessions = SessionTracker()
    server = SSHServer(
        node_id="n0",
        state=sm,
        cluster=cluster,
        jobs_dir=tmp / "jobs",
        sessions=sessions,
        host_key=host_key,
        port=0,
        **kw,  # type: ignore[arg-type]
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        known = tmp / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
        yield Env(tmp, sm, cluster, sessions, server, key, known, job_id, work)
        nursery.cancel_scope.cancel()
