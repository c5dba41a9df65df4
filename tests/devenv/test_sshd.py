"""The SSH server in-process (over a plain state machine) with the real OpenSSH client: what a
session sees, PTY, scp, sftp, port and agent forwarding, refusals, and the server's health."""

from __future__ import annotations

import hashlib
import os
import subprocess
from functools import partial
from pathlib import Path

import trio

from meshgpu.devenv.target import judge
from meshgpu.testing import free_port
from tests.devenv._sshd import keygen, needs_openssh, run, sshd

pytestmark = needs_openssh


async def test_exec_runs_in_the_job(tmp_path: Path) -> None:
    async with sshd(tmp_path) as env:
        r = await env.ssh("echo $MESHGPU_RUN_NAME $DSTACK_RUN_NAME; pwd; exit 3")
        assert r.returncode == 3, r.stderr
        assert r.stdout.decode().split() == ["dev", "dev", str(env.work)]
        # RUN-0 and the job id name the same job; stdin reaches the command.
        for user in ("dev-0", env.job_id):
            r = await env.ssh("cat", user=user, stdin=b"hello\n")
            assert (r.returncode, r.stdout) == (0, b"hello\n"), r.stderr
        r = await env.ssh("echo out; echo err >&2")
        assert (r.stdout, r.stderr) == (b"out\n", b"err\n")
        r = await env.ssh("kill -TERM $$")
        assert r.returncode == 255  # the exit signal, as OpenSSH's client reports it


async def test_pty_shell(tmp_path: Path) -> None:
    async with sshd(tmp_path) as env:
        script = b"tty; echo $TERM $MESHGPU_RUN_NAME; stty size; exit 7\n"
        argv = env.ssh_argv("dev", key=None)
        argv[1:1] = ["-tt"]
        r = await run([*argv], stdin=script)
        out = r.stdout.decode()
        assert r.returncode == 7, (out, r.stderr)
        assert "/dev/pts/" in out and " dev" in out


async def test_scp_both_ways_and_sftp(tmp_path: Path) -> None:
    async with sshd(tmp_path) as env:
        data = os.urandom(3 << 20)
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        port = ["-P", str(env.port)]
        r = await run(["scp", *env.ssh_opts(), *port, str(src), "dev@127.0.0.1:in.bin"])
        assert r.returncode == 0, r.stderr
        assert (env.work / "in.bin").read_bytes() == data  # relative: the job's working dir
        back = tmp_path / "back.bin"
        r = await run(["scp", *env.ssh_opts(), *port, "dev@127.0.0.1:in.bin", str(back)])
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(data).digest()
        # The legacy scp protocol (an exec of `scp -t`) works too.
        r = await run(["scp", "-O", *env.ssh_opts(), *port, str(src), "dev@127.0.0.1:legacy.bin"])
        assert r.returncode == 0, r.stderr
        assert (env.work / "legacy.bin").read_bytes() == data

        r = await run(
            ["sftp", "-b", "-", *env.ssh_opts(), *port, "dev@127.0.0.1"], stdin=b"pwd\nls -1\n"
        )
        assert r.returncode == 0, r.stderr
        out = r.stdout.decode()
        assert str(env.work) in out and "in.bin" in out and "legacy.bin" in out


async def test_local_port_forwarding(tmp_path: Path) -> None:
    async with sshd(tmp_path) as env:
        (env.work / "hello.txt").write_text("from the job\n")
        job_port, local = free_port(), free_port()
        async with trio.open_nursery() as nursery:
            # An HTTP server started inside the job, on the job's port.
            serve = f"exec python3 -m http.server {job_port} --bind 127.0.0.1"
            nursery.start_soon(partial(env.ssh, serve, timeout=60))
            fwd = await trio.lowlevel.open_process(
                [
                    *env.ssh_argv("dev", "-N", "-L", f"{local}:127.0.0.1:{job_port}"),
                    "-o",
                    "ExitOnForwardFailure=yes",
                ],  # fmt: skip
            )
            try:
                body = b""
                with trio.fail_after(20):
                    while b"from the job" not in body:
                        r = await run(["curl", "-s", f"http://127.0.0.1:{local}/hello.txt"])
                        body = r.stdout
                        await trio.sleep(0.1)
                # Only the job's host: another address is refused.
                r = await env.ssh("-W", "10.255.255.1:80")
                assert r.returncode == 255 and b"forwarding failed" in r.stderr
            finally:
                fwd.kill()
                await fwd.wait()
                await env.ssh(f"pkill -f 'http.server {job_port}'")
                nursery.cancel_scope.cancel()


async def test_agent_forwarding(tmp_path: Path) -> None:
    async with sshd(tmp_path) as env:
        sock = tmp_path / "agent.sock"
        agent = await trio.lowlevel.open_process(["ssh-agent", "-D", "-a", str(sock)])
        try:
            with trio.fail_after(10):
                while not sock.exists():
                    await trio.sleep(0.05)
            e = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
            await run(["ssh-add", str(env.key)], env=e)
            argv = env.ssh_argv("dev", "-A", "ssh-add -l; echo sock=$SSH_AUTH_SOCK")
            r = await run(argv, env=e)
            assert r.returncode == 0, r.stderr
            assert b"ED25519" in r.stdout and b"sock=/" in r.stdout
        finally:
            agent.kill()
            await agent.wait()


async def test_refusals(tmp_path: Path) -> None:
    async with sshd(tmp_path) as env:
        other = tmp_path / "other"
        keygen(other)
        r = await env.ssh("true", key=other)
        assert r.returncode == 255 and b"Permission denied" in r.stderr
        r = await env.ssh("true", user="nosuchrun")
        assert r.returncode == 255 and b"no run or job named 'nosuchrun'" in r.stderr
        r = await env.ssh("true", user="dev-5")
        assert r.returncode == 255 and b"has no job 5" in r.stderr
        assert env.sessions.sessions(env.job_id) == 0
        # A job that ended: a clean error, at once.
        env.end_job()
        with trio.fail_after(10):
            r = await env.ssh("true")
        assert r.returncode == 255 and b"has ended (done" in r.stderr, r.stderr


async def test_other_projects_are_refused(tmp_path: Path) -> None:
    async with sshd(tmp_path) as env:
        key = next(iter(env.cluster.ssh_keys.values()))
        assert judge(env.state, env.cluster, "n0", "dev", key.fingerprint).target is not None
        env.cluster.ssh_keys[key.fingerprint] = key.model_copy(update={"user": "alice"})
        r = await env.ssh("true")
        assert r.returncode == 255 and b"Permission denied" in r.stderr


async def test_sessions_are_counted_and_end_with_the_job(tmp_path: Path) -> None:
    async with sshd(tmp_path) as env:
        changes: list[int] = []
        env.sessions.on_change(lambda j: changes.append(env.sessions.sessions(j)))
        await env.ssh("true")
        with trio.fail_after(10):  # the server sees the connection close a moment later
            while changes != [1, 0]:
                await trio.sleep(0.02)
        assert env.sessions.last_closed(env.job_id) is not None
        async with trio.open_nursery() as nursery:
            done = trio.Event()
            result: list[subprocess.CompletedProcess[bytes]] = []

            async def hold() -> None:
                result.append(await env.ssh("sleep 60", timeout=30))
                done.set()

            nursery.start_soon(hold)
            with trio.fail_after(10):
                while env.sessions.sessions(env.job_id) != 1:
                    await trio.sleep(0.02)
            env.end_job()  # the job ends: its sessions are disconnected, saying why
            with trio.fail_after(10):
                await done.wait()
        assert result[0].returncode == 255 and b"the job has ended" in result[0].stderr
        # the client may exit before the server's close reaches the trio side: a moment later
        with trio.fail_after(10):
            while env.sessions.sessions(env.job_id) or env.server.connections(env.job_id):
                await trio.sleep(0.02)


async def test_client_gone_mid_transfer_leaves_the_server_healthy(tmp_path: Path) -> None:
    async with sshd(tmp_path) as env:
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(64 << 20))
        for argv in (
            ["scp", *env.ssh_opts(), "-P", str(env.port), str(big), "dev@127.0.0.1:big.bin"],
            [*env.ssh_argv("dev", "cat /dev/zero")],
        ):
            p = await trio.lowlevel.open_process(argv, stdout=subprocess.DEVNULL)
            await trio.sleep(0.3)
            p.kill()
            await p.wait()
        with trio.fail_after(10):
            while env.sessions.sessions(env.job_id):
                await trio.sleep(0.05)
        r = await env.ssh("echo still here")
        assert r.stdout == b"still here\n"
        # The session's processes went with it (SIGHUP when its channel closed).
        with trio.fail_after(10):
            while (await env.ssh("pgrep -xf 'cat /dev/zero' || echo none")).stdout != b"none\n":
                await trio.sleep(0.1)
