"""One SSH session channel inside a job: a shell (with a PTY or not), a command, or the SFTP
subsystem (OpenSSH's own ``sftp-server``, which ``scp`` speaks too). asyncio only: runs on the
SSH server's loop (``aio.py``).

The data path is the kernel's pipes or PTY and asyncssh's channel, joined with flow control both
ways and no per-byte Python work: output a process writes goes to the channel as it is read (the
pipe is paused while the channel's send buffer is full), and what the client sends is written to
the process's stdin (the channel stops opening its window while the pipe is full).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from meshgpu.runner import sandbox

log = logging.getLogger(__name__)

SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
    "/usr/lib/ssh/sftp-server",
)
# Environment variables a client may send (OpenSSH's default SendEnv/AcceptEnv).
ACCEPT_ENV = ("LANG", "LC_", "COLORTERM", "TERM_PROGRAM")
KILL_AFTER_S = 5.0  # a session's processes get SIGHUP when it closes, SIGKILL this much later


def find_sftp_server() -> str | None:
    for path in SFTP_SERVERS:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("sftp-server")


@dataclass
class JobContext:
    """How a session runs inside one job (from its ``job.json`` and the connection)."""

    job_id: str
    env: dict[str, str]
    cwd: str
    shell: str
    container: tuple[str, str] | None = None  # (runtime, container name) for image jobs
    extra_env: dict[str, str] = field(default_factory=dict)  # SSH_CONNECTION, ...
    agent_path: Any = None  # () -> the forwarded agent's socket path, or None
    # A sandboxed process job (meshgpu/runner/sandbox.py's JSON form) and its first process:
    # sessions enter the same cgroups, mount namespace and user.
    sandbox: dict[str, Any] | None = None
    job_pid: int | None = None
    # Said on the session's stderr when it starts (e.g. its secret variables are unavailable).
    notice: str = ""
    secret_names: list[str] = field(default_factory=list)  # variables whose values are secrets
    pending: Any = None  # an asyncio task that completes ``env`` (its secret variables)
    # The job has a PID namespace of its own (its init is ``job_pid``): sessions join it.
    pid_ns: bool = False

    def preexec(self, tty: bool) -> Callable[[], None] | None:
        """What the session's child runs before exec: take the PTY as its terminal, enter the
        job's sandbox (then start where the job does: cwd was set before the mounts)."""
        box, pid, cwd, pid_ns = self.sandbox, self.job_pid, self.cwd, self.pid_ns
        if box is None or pid is None:
            return _controlling_tty if tty else None

        def enter() -> None:
            if tty:
                _controlling_tty()
            sandbox.enter_job(box, pid, pid_ns)
            os.chdir(cwd)

        return enter

    def command(self, argv: list[str]) -> list[str]:
        """The argv the session's child execs. Joining a PID namespace (``setns``) places only
        the caller's *children* in it, so in a job with one the command runs as the child of
        util-linux's ``unshare --fork`` (no namespace of its own: a plain fork), which waits
        for it and ends the way it did (its exit code or signal); it lets the signals a
        session sends its process group (SIGINT, SIGTERM) reach the command alone. One extra
        process per session, already in the job's cgroups and running as its user."""
        if not self.pid_ns or self.sandbox is None or self.job_pid is None:
            return argv
        return [_unshare(), "--fork", "--", *argv]


def _unshare() -> str:
    path = shutil.which("unshare") or "/usr/bin/unshare"
    if not os.access(path, os.X_OK):
        raise RuntimeError(
            "this job has a PID namespace and sessions join it through unshare(1), which this "
            "host lacks: install util-linux"
        )
    return path


def _winsize(fd: int, size: tuple[int, int, int, int]) -> None:
    cols, rows, xpix, ypix = size
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, xpix, ypix))


def _controlling_tty() -> None:  # in the child, after setsid: the PTY becomes its terminal
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class JobSession(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    def __init__(self, ctx: JobContext, sftp_server: str | None) -> None:
        self.ctx, self.sftp_server = ctx, sftp_server
        self.chan: Any = None
        self.term: tuple[str, tuple[int, int, int, int]] | None = None
        self.command: str | None = None
        self.subsystem: str | None = None
        self.proc: asyncio.SubprocessTransport | None = None
        self.stdin: Any = None  # a write transport: the pipe, or the PTY master
        self.readers: list[Any] = []  # read transports paused with the channel
        self.master: int | None = None
        self._exited = False
        self._pty_done: asyncio.Event | None = None
        self._writing_paused = False
        self._pending: list[bytes] = []
        self._pending_eof = False

    # ---- asyncssh's callbacks (the client's requests) ----

    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def pty_requested(
        self, term_type: str, term_size: tuple[int, int, int, int], _modes: Any
    ) -> bool:
        self.term = (term_type or "xterm", term_size)
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self.command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem != "sftp":
            return False
        self.subsystem = subsystem
        return True

    def session_started(self) -> None:
        asyncio.get_running_loop().create_task(self._start())

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self.stdin is None:  # before the process is up: held, and the channel paused
            self._pending.append(data)
            self.chan.pause_reading()
        elif not self.stdin.is_closing():
            self.stdin.write(data)

    def eof_received(self) -> bool:
        if self.stdin is None:
            self._pending_eof = True
        elif self.master is None and self.stdin.can_write_eof():
            self.stdin.write_eof()
        return True  # keep the channel open for the process's output

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self.master is not None:
            _winsize(self.master, (width, height, pixwidth, pixheight))  # the kernel SIGWINCHes

    def signal_received(self, signame: str) -> None:
        sig = getattr(signal, f"SIG{signame}", None)
        if sig is not None:
            self._signal(sig)

    def break_received(self, msec: int) -> bool:
        self._signal(signal.SIGINT)
        return True

    def pause_writing(self) -> None:  # the channel's send buffer is full: stop reading output
        self._writing_paused = True
        for r in self.readers:
            with contextlib.suppress(Exception):
                r.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        for r in self.readers:
            with contextlib.suppress(Exception):
                r.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.chan = None
        if self.proc is not None and not self._exited:
            self._signal(signal.SIGHUP)
            proc = self.proc
            asyncio.get_running_loop().call_later(KILL_AFTER_S, _kill, proc)
        if self.master is not None and self.stdin is not None:
            self.stdin.close()

    # ---- the process ----

    def _argv(self) -> list[str]:
        ctx = self.ctx
        if self.subsystem == "sftp":
            if self.sftp_server is None:
                raise RuntimeError(
                    "this host has no sftp-server (install openssh-sftp-server); "
                    "`scp -O` copies without it"
                )
            return ctx.command([self.sftp_server])
        inner = [ctx.shell, "-c", self.command] if self.command is not None else [ctx.shell]
        if ctx.container is not None:
            runtime, name = ctx.container
            argv = [runtime, "exec", "-i"]
            if self.term is not None:
                argv += ["-t", "-e", f"TERM={self.term[0]}"]
            return [*argv, name, *inner]
        return ctx.command(inner)

    def _env(self) -> dict[str, str]:
        env = dict(self.ctx.env)
        for k, v in (self.chan.get_environment() or {}).items():
            if isinstance(k, str) and isinstance(v, str) and k.startswith(ACCEPT_ENV):
                env[k] = v
        env.update(self.ctx.extra_env)
        if self.term is not None:
            env["TERM"] = self.term[0]
        agent = self.ctx.agent_path() if self.ctx.agent_path is not None else None
        if agent:
            env["SSH_AUTH_SOCK"] = agent
        if self.command is not None:
            env["SSH_ORIGINAL_COMMAND"] = self.command
        return env

    async def _start(self) -> None:
        chan = self.chan
        if chan is None:
            return
        if self.ctx.pending is not None:
            await asyncio.shield(self.ctx.pending)  # never raises: it says why in ``notice``
            if self.chan is None:
                return
        if self.ctx.notice and self.subsystem is None:
            chan.write_stderr(f"{self.ctx.notice}\r\n".encode())
        loop = asyncio.get_running_loop()
        try:
            argv, env = self._argv(), self._env()
            if self.term is not None and self.subsystem is None:
                await self._start_pty(loop, argv, env)
            else:
                await self._start_pipes(loop, argv, env)
            for data in self._pending:
                self.stdin.write(data)
            self._pending.clear()
            if self._pending_eof:
                # After the pipe transport's own setup (it adds its reader with call_soon: an
                # EOF before that would leave a reader on a closed pipe).
                await asyncio.sleep(0)
                self.eof_received()
            if self.chan is not None:
                self.chan.resume_reading()
        except Exception as e:
            log.info("session in job %s failed to start: %s", self.ctx.job_id, e)
            if self.chan is not None:
                self.chan.write_stderr(f"meshgpu: cannot start the session: {e}\r\n".encode())
                self.chan.exit(255)
            return

    async def _start_pipes(
        self, loop: asyncio.AbstractEventLoop, argv: list[str], env: dict[str, str]
    ) -> None:
        transport, _ = await loop.subprocess_exec(
            lambda: _PipeProtocol(self),
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.ctx.cwd,
            env=env,
            start_new_session=True,
            preexec_fn=self.ctx.preexec(tty=False),
        )
        self.proc = transport
        self.stdin = transport.get_pipe_transport(0)
        self.readers = [transport.get_pipe_transport(1), transport.get_pipe_transport(2)]
        if self._writing_paused:
            self.pause_writing()

    async def _start_pty(
        self, loop: asyncio.AbstractEventLoop, argv: list[str], env: dict[str, str]
    ) -> None:
        assert self.term is not None
        master, slave = os.openpty()
        try:
            _winsize(slave, self.term[1])
            env["SSH_TTY"] = os.ttyname(slave)
            transport, _ = await loop.subprocess_exec(
                lambda: _PtyProcessProtocol(self),
                *argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=self.ctx.cwd,
                env=env,
                start_new_session=True,
                preexec_fn=self.ctx.preexec(tty=True),
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.proc, self.master = transport, master
        self._pty_done = asyncio.Event()
        reader, _ = await loop.connect_read_pipe(
            lambda: _PtyReader(self), os.fdopen(master, "rb", buffering=0, closefd=False)
        )
        writer, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(os.dup(master), "wb", buffering=0)
        )
        self.stdin, self.readers = writer, [reader]
        if self._writing_paused:
            self.pause_writing()

    def _signal(self, sig: int) -> None:
        pid = self.proc.get_pid() if self.proc is not None else None
        if pid is None or self._exited:
            return
        with contextlib.suppress(OSError):
            os.killpg(pid, sig)  # the session leads its own process group

    async def abort(self, timeout: float = 2.0) -> None:
        """The server is stopping: kill the session's process group and wait (bounded) until
        the process is reaped and its pipes are closed (``_finish``)."""
        proc = self.proc
        if proc is None or proc.is_closing():
            return
        _kill(proc)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not proc.is_closing() and proc.get_returncode() is None:
                    await asyncio.sleep(0.01)
        if not proc.is_closing():
            for t in (*self.readers, self.stdin):
                if t is not None:
                    t.close()
            proc.close()
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = None

    def _output(self, data: bytes, stderr: bool = False) -> None:
        if self.chan is None:
            return
        if stderr:
            self.chan.write_stderr(data)
        else:
            self.chan.write(data)

    def _finish(self) -> None:
        """The process has exited and its output is read: the exit status, then close."""
        chan, proc = self.chan, self.proc
        if self.master is not None:
            for t in (*self.readers, self.stdin):
                if t is not None:
                    t.close()
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = None
        if proc is None:
            return
        code = proc.get_returncode()
        proc.close()  # exited: releases the transport (its pipes are closed)
        if chan is None:
            return
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name.removeprefix("SIG")
            except ValueError:
                name = "KILL"
            chan.exit_with_signal(name)
        else:
            chan.exit(code or 0)

    async def _pty_finish(self) -> None:
        # The shell exited: what it wrote before is still in the PTY; wait for the reader to
        # drain it (EIO once no process holds the terminal), but not for a background process
        # that keeps it open.
        assert self._pty_done is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._pty_done.wait(), 0.5)
        self._finish()


class _PipeProtocol(asyncio.SubprocessProtocol):
    def __init__(self, session: JobSession) -> None:
        self.session = session

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.session._output(data, stderr=fd == 2)

    def pause_writing(self) -> None:  # stdin's pipe is full: stop the channel's window
        if self.session.chan is not None:
            self.session.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.session.chan is not None:
            self.session.chan.resume_reading()

    def process_exited(self) -> None:
        self.session._exited = True

    def connection_lost(self, exc: Exception | None) -> None:  # exited, every pipe closed
        self.session._exited = True
        self.session._finish()


class _PtyProcessProtocol(asyncio.SubprocessProtocol):
    def __init__(self, session: JobSession) -> None:
        self.session = session

    def process_exited(self) -> None:
        self.session._exited = True
        asyncio.get_running_loop().create_task(self.session._pty_finish())


class _PtyReader(asyncio.Protocol):
    def __init__(self, session: JobSession) -> None:
        self.session = session

    def data_received(self, data: bytes) -> None:
        self.session._output(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:  # EIO: no process holds the PTY
        if self.session._pty_done is not None:
            self.session._pty_done.set()


def _kill(proc: asyncio.SubprocessTransport) -> None:
    pid = proc.get_pid()
    if pid is not None and proc.get_returncode() is None:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
