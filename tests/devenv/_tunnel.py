"""The tunnel end to end without agents: the API app (real use cases over a plain state
machine) served by hypercorn over TLS on loopback, a run ``dev`` whose job 0 runs on host
``n0``, and, standing in for the SSH server, OpenSSH's own sshd (or a TCP echo server) at the
address ``n0``'s record names. The API is node ``n1``'s: the job runs elsewhere."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import hypercorn.config
import hypercorn.trio
import pytest
import trio

from meshgpu.api.app import create_app
from meshgpu.api.server import listen, serve
from meshgpu.client.profile import write_profile
from meshgpu.scheduler import plan
from meshgpu.security import NodeIdentity
from meshgpu.security.pki import create_cluster
from meshgpu.state import JobFinished, JobTerminationReason, StateMachine
from tests.api._stub import TOKEN, StubAgent
from tests.scheduler._world import apply_plan, host, jobs, submit, task, world

ROOT = Path(__file__).resolve().parents[2]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
needs_openssh = pytest.mark.skipif(
    shutil.which("ssh") is None or not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None,
    reason="OpenSSH is not installed (scripts/test installs openssh-client and openssh-server)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "t@meshgpu", "-f", str(path)],
        check=True,
    )
    return path.with_name(path.name + ".pub").read_text()


@dataclass
class OpenSSHd:
    port: int
    key: Path  # a client key it accepts (as root)
    host_pub: str  # its host key line


@contextmanager
def openssh_server(tmp: Path) -> Iterator[OpenSSHd]:
    """OpenSSH's sshd on a free loopback port: root with ``key``, nothing else."""
    d = tmp / "sshd"
    d.mkdir()
    host_pub = keygen(d / "host_key")
    key = d / "client_key"
    (d / "authorized_keys").write_text(keygen(key))
    port = free_port()
    conf = d / "sshd_config"
    conf.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nSubsystem sftp internal-sftp\n"
        "LogLevel ERROR\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(conf)], stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("sshd did not start") from None
                trio_sleep_blocking(0.02)
        yield OpenSSHd(port, key, host_pub.strip())
    finally:
        proc.terminate()
        proc.wait(5)


def trio_sleep_blocking(s: float) -> None:
    import time

    time.sleep(s)


@dataclass
class Node:
    """The API of node ``n1`` over TLS, and a client profile that trusts it."""

    url: str
    profile: Path
    state: StateMachine
    job_id: str
    tmp: Path

    def env(self, **more: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MESHGPU_URL", None)
        env.pop("MESHGPU_TOKEN", None)
        env.update(MESHGPU_CONFIG=str(self.profile), PYTHONPATH=str(ROOT), HOME=str(self.tmp))
        env.update(more)
        return env

    def proxy_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "meshgpu", "ssh-proxy", *args]

    def end_job(self) -> None:
        job = self.state.jobs[self.job_id]
        self.state.apply_command(
            JobFinished(
                at=9, job_id=job.job_id, epoch=job.epoch, reason=JobTerminationReason.DONE_BY_RUNNER
            )
        )


def make_state(ssh_address: str | None) -> tuple[StateMachine, str]:
    """Run ``dev``: job 0 running on ``n0`` (whose SSH server is at ``ssh_address``)."""
    n0 = host("n0").model_copy(update={"ssh_address": ssh_address})
    sm = world(n0, submit("dev", task(None) | {"commands": ["sleep infinity"]}, at=1))
    apply_plan(sm, plan(sm, now=1), at=1)
    return sm, jobs(sm, "dev")[0].job_id


@asynccontextmanager
async def api_node(tmp: Path, ssh_address: str | None, old: bool = False) -> AsyncIterator[Node]:
    """``old``: the app served by hypercorn alone, as a node from before the API port's front
    (the WebSocket tunnel only)."""
    sm, job_id = make_state(ssh_address)
    services = StubAgent(sm, tmp, node_id="n1")
    identity = NodeIdentity(tmp / "tls-n1")
    create_cluster(identity, 1, ("127.0.0.1",))
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    url = f"https://127.0.0.1:{port}"
    profile = tmp / "client.toml"
    write_profile(profile, url, TOKEN, ca=identity.files.ca_cert.read_text())
    async with trio.open_nursery() as nursery:
        if old:
            await nursery.start(
                partial(hypercorn.trio.serve, create_app(services), _old(sock, identity))
            )
        else:
            await serve(nursery, sock, services, identity)
        yield Node(url, profile, sm, job_id, tmp)
        nursery.cancel_scope.cancel()


def _old(sock: socket.socket, identity: NodeIdentity) -> hypercorn.config.Config:
    cfg = hypercorn.config.Config()
    cfg.bind = [f"fd://{sock.detach()}"]
    cfg.certfile, cfg.keyfile = str(identity.files.cert), str(identity.files.key)
    cfg.accesslog = None
    return cfg


async def run(
    argv: list[str], stdin: bytes = b"", timeout: float = 30, **kw: object
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(
            argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False, **kw
        )


def ssh_argv(node: Node, sshd: OpenSSHd, *args: str, proxy: str = "dev") -> list[str]:
    """The real OpenSSH client, through ``meshgpu ssh-proxy`` to the stand-in sshd."""
    known = node.tmp / "known_hosts"
    known.write_text(f"dev {sshd.host_pub}\n")
    proxy_cmd = " ".join([sys.executable, "-m", "meshgpu", "ssh-proxy", proxy])
    return [
        "ssh", "-F", "/dev/null",
        "-i", str(sshd.key),
        "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known}",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes",
        "-o", "LogLevel=ERROR",
        "-o", f"ProxyCommand={proxy_cmd}",
        "-l", "root", "dev", *args,
    ]  # fmt: skip
