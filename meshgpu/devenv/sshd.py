"""The SSH server in every agent: sessions inside the jobs this host runs.

Users authenticate with public keys registered through the API (``/api/v1/ssh/keys``, kept in
the replicated state); the username names the job (``RUN``, ``RUN-N`` or a job id:
``target.py``). A session runs as the job does: its environment (``job.json``, and the
variables that hold its project secrets, which are never on disk: asked of the executor), working
directory and OS user (for an image job, ``<runtime> exec`` into its container), with a PTY
shell, exec, SFTP (and so scp), local port forwarding to the job's host (127.0.0.1 only) and
agent forwarding. Every authenticated connection is one session in the agent's
``SessionTracker`` (whatever channels it carries: an ``ssh -N -L`` attach counts). A job that
is not running here is refused with the reason; one that ends disconnects its sessions.

asyncssh is asyncio; the agent is trio. The server runs on its own asyncio loop in a thread
(``aio.py``): the data path (ciphers, channels, pipes) never touches trio, and trio's state is
read and changed only on the trio loop (``call_trio``/``notify_trio``): the key and job checks
at authentication, the SessionTracker, and ``notify`` (on each applied entry, from trio) which
ends the sessions of jobs that ended.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import pwd
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh
import trio

from meshgpu.devenv.aio import AsyncioThread
from meshgpu.devenv.session import JobContext, JobSession, find_sftp_server
from meshgpu.devenv.target import Target, Verdict, judge, still_serves
from meshgpu.runner import sandbox as sandbox_mod

if TYPE_CHECKING:
    from meshgpu.devenv.sessions import SessionTracker
    from meshgpu.state import StateMachine
    from meshgpu.state.cluster import ClusterState

log = logging.getLogger(__name__)

DEFAULT_SSH_PORT = 7482
# The data path: a large window and packets (OpenSSH's client sends up to the server's maximum
# packet size; a large window keeps a long copy from stalling on window adjusts).
WINDOW = 16 << 20
MAX_PKTSIZE = 256 << 10
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "ip6-localhost"})


def _login_shell(uid: int | None = None) -> str:
    try:
        shell = pwd.getpwuid(os.getuid() if uid is None else uid).pw_shell
    except KeyError:
        shell = ""
    return shell if shell and os.access(shell, os.X_OK) and "nologin" not in shell else "/bin/sh"


def load_job_context(jobs_dir: Path, job_id: str) -> JobContext:
    """How sessions run in ``job_id``: its ``job.json`` (written by the executor when it
    started the job)."""
    record = json.loads((jobs_dir / job_id / "job.json").read_text())
    env = {str(k): str(v) for k, v in (record.get("env") or {}).items()}
    # A sandboxed job's sessions run in its sandbox: its user (HOME/USER are in its env), its
    # mount namespace and cgroups (entered through its first process: job.pid).
    sandbox = record.get("sandbox") or None
    job_pid = None
    pid_ns = False
    if sandbox is not None:
        try:
            job_pid = int(json.loads((jobs_dir / job_id / "job.pid").read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            raise RuntimeError("the job's process is not known yet; try again shortly") from None
        # Its PID namespace, if it got one (its init is job_pid): the kernel's word, not the
        # record's, so a job that ran without one (the host refused it) is entered as it is.
        pid_ns = sandbox_mod.own_pid_ns(job_pid)
    user = pwd.getpwuid(os.getuid())
    env.setdefault("HOME", user.pw_dir)
    env.setdefault("USER", user.pw_name)
    env.setdefault("LOGNAME", user.pw_name)
    env.setdefault("PATH", os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"))
    job_uid = ((sandbox or {}).get("user") or {}).get("uid")
    shell = _login_shell(job_uid)
    if job_uid is not None and shell == "/bin/sh":
        shell = next((s for s in ("/bin/bash", "/usr/bin/bash") if os.access(s, os.X_OK)), shell)
    env.setdefault("SHELL", shell)
    container = None
    argv = record.get("argv") or []
    if len(argv) > 2 and argv[1] == "run" and "--name" in argv:  # an image job (container.py)
        container = (argv[0], argv[argv.index("--name") + 1])
        shell = "/bin/sh"
    secret_names = [str(k) for k in record.get("secret_env") or ()]
    cwd = record.get("cwd") or str(jobs_dir / job_id / "work")
    wd = env.get("MESHGPU_WORKING_DIR")
    if container is None and wd and os.path.isdir(wd):
        cwd = wd  # the job's ``working_dir`` (its prologue made it), where its commands run
    return JobContext(
        job_id=job_id,
        env=env,
        cwd=cwd,
        shell=shell,
        container=container,
        sandbox=sandbox,
        job_pid=job_pid,
        secret_names=secret_names,
        pid_ns=pid_ns,
    )


class _Connection(asyncssh.SSHServer):
    """One client connection (asyncio side)."""

    def __init__(self, server: SSHServer) -> None:
        self.server = server
        self.conn: Any = None
        self.id = next(server._ids)
        self.verdict: Verdict | None = None
        self.ctx: JobContext | None = None
        self.opened = False
        self.channels: list[JobSession] = []

    def connection_made(self, conn: Any) -> None:
        self.conn = conn

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    async def validate_public_key(self, username: str, key: Any) -> bool:
        fingerprint = key.get_fingerprint("sha256")
        verdict = await self.server.bridge.call_trio(self.server._judge, username, fingerprint)
        if verdict.key_ok:
            self.verdict = verdict
        return verdict.key_ok

    async def auth_completed(self) -> None:
        verdict = self.verdict
        if verdict is None or verdict.target is None:
            why = verdict.error if verdict is not None else "not allowed"
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"meshgpu: {why}")
            return
        target = verdict.target
        try:
            self.ctx = load_job_context(self.server.jobs_dir, target.job_id)
        except (OSError, ValueError) as e:
            msg = f"meshgpu: the job's record on this host cannot be read ({e})"
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, msg)
            return
        if self.ctx.secret_names:
            # Asked now, awaited by each session before its process starts (asyncssh already
            # accepts the client's channel requests while this method runs).
            self.ctx.pending = asyncio.ensure_future(self._secret_env(target.job_id))
        peer = self.conn.get_extra_info("peername") or ("", 0)
        local = self.conn.get_extra_info("sockname") or ("", 0)
        self.ctx.extra_env = {
            "SSH_CONNECTION": f"{peer[0]} {peer[1]} {local[0]} {local[1]}",
            "SSH_CLIENT": f"{peer[0]} {peer[1]} {local[1]}",
        }
        self.ctx.agent_path = self.conn.get_agent_path
        self.opened = True
        self.server.bridge.notify_trio(self.server._opened, target, self)

    async def _secret_env(self, job_id: str) -> None:
        """The job's secret variables into the session's environment (from the executor, on
        the trio loop); a session without them says so, and why."""
        assert self.ctx is not None
        names = ", ".join(self.ctx.secret_names)
        lookup = self.server.secret_env
        try:
            if lookup is None:
                raise RuntimeError("this host's SSH server has no access to them")
            values = await self.server.bridge.call_trio_async(lookup, job_id)
        except Exception as e:  # the session still opens, saying what it lacks
            log.warning("job=%s: secret variables unavailable to an SSH session: %s", job_id, e)
            why = str(e) or type(e).__name__
            self.ctx.notice = f"meshgpu: the job's secret variables ({names}) are unavailable "
            self.ctx.notice += f"in this session: {why}"
            return
        self.ctx.env.update(values)

    def session_requested(self) -> Any:
        if self.ctx is None:
            return False
        session = JobSession(self.ctx, self.server.sftp_server)
        self.server.live.add(session)
        self.channels = [c for c in self.channels if c.chan is not None]
        self.channels.append(session)
        return session

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        if self.ctx is None:
            return False
        if dest_host.lower() not in LOCAL_HOSTS:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                "meshgpu: only the job's own ports can be forwarded (127.0.0.1:PORT)",
            )
        return True  # asyncssh connects and relays

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False  # no remote forwarding (-R)

    def unix_connection_requested(self, dest_path: str) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.opened:
            self.opened = False
            assert self.verdict is not None and self.verdict.target is not None
            self.server.bridge.notify_trio(self.server._closed, self.verdict.target, self)

    def end(self, why: str) -> None:
        """The job ended (or left this host): disconnect, saying why (asyncio side)."""
        if self.conn is None:
            return
        for session in self.channels:  # said where a user sees it (not only in ssh -v)
            if session.chan is not None and session.subsystem is None:
                session.chan.write_stderr(f"\r\nmeshgpu: {why}\r\n".encode())
        self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"meshgpu: {why}")


class SSHServer:
    """The agent's SSH server (trio side): ``run`` in the agent's nursery; ``notify`` on every
    applied entry."""

    def __init__(
        self,
        *,
        node_id: str,
        state: StateMachine,
        cluster: ClusterState,
        jobs_dir: Path,
        sessions: SessionTracker,
        host_key: bytes,
        bind: str = "127.0.0.1",
        port: int = DEFAULT_SSH_PORT,
        window: int = WINDOW,
        max_pktsize: int = MAX_PKTSIZE,
        sftp_server: str | None | Callable[[], str | None] = find_sftp_server,
        secret_env: Callable[[str], Awaitable[dict[str, str]]] | None = None,
    ) -> None:
        self.node_id, self.state, self.cluster = node_id, state, cluster
        self.jobs_dir, self.sessions = jobs_dir, sessions
        self.host_key, self.bind, self.port = host_key, bind, port
        self.window, self.max_pktsize = window, max_pktsize
        self.sftp_server = sftp_server() if callable(sftp_server) else sftp_server
        self.bridge = AsyncioThread("sshd")
        # A job's secret variables (name -> value), awaited on the trio loop: the executor's
        # ``session_secrets`` (they are in no file on this host).
        self.secret_env = secret_env
        self._ids = itertools.count(1)
        # Every session's process, so that stopping the server leaves none behind (asyncio side).
        self.live: weakref.WeakSet[JobSession] = weakref.WeakSet()
        self._server: Any = None
        # job -> its open connections (trio side, like the SessionTracker)
        self._by_job: dict[str, dict[int, _Connection]] = {}

    # ---- trio side ----

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        self.bridge.start()
        try:
            self.port = await self.bridge.run(self._listen())
            log.info("SSH server on %s:%d", self.bind, self.port)
            task_status.started(self.port)
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._shutdown)

    def notify(self, _applied: object = None) -> None:
        """After applied entries: end the sessions of jobs that ended or left this host."""
        for job_id, conns in list(self._by_job.items()):
            why = still_serves(self.state, self.node_id, job_id)
            if why is not None and self.bridge.loop is not None:
                for c in list(conns.values()):
                    self.bridge.loop.call_soon_threadsafe(c.end, why)

    def connections(self, job_id: str) -> int:
        return len(self._by_job.get(job_id, {}))

    def _judge(self, username: str, fingerprint: str) -> Verdict:
        return judge(self.state, self.cluster, self.node_id, username, fingerprint)

    def _opened(self, target: Target, conn: _Connection) -> None:
        self._by_job.setdefault(target.job_id, {})[conn.id] = conn
        self.sessions.opened(target.job_id)
        why = still_serves(self.state, self.node_id, target.job_id)
        if why is not None and self.bridge.loop is not None:  # ended while authenticating
            self.bridge.loop.call_soon_threadsafe(conn.end, why)

    def _closed(self, target: Target, conn: _Connection) -> None:
        conns = self._by_job.get(target.job_id, {})
        if conns.pop(conn.id, None) is not None:
            self.sessions.closed(target.job_id)
        if not conns:
            self._by_job.pop(target.job_id, None)

    # ---- asyncio side ----

    async def _listen(self) -> int:
        self._server = await asyncssh.create_server(
            lambda: _Connection(self),
            self.bind,
            self.port,
            server_host_keys=[asyncssh.import_private_key(self.host_key)],
            encoding=None,
            line_editor=False,
            agent_forwarding=True,
            x11_forwarding=False,
            allow_scp=False,
            window=self.window,
            max_pktsize=self.max_pktsize,
            login_timeout=30,
            keepalive_interval=30,
            keepalive_count_max=4,
            reuse_address=True,
        )
        return self._server.sockets[0].getsockname()[1]

    def _shutdown(self) -> None:
        loop = self.bridge.loop
        if loop is not None and self._server is not None and loop.is_running():

            async def close() -> None:
                self._server.close()
                # Sessions whose client left are still ending (SIGHUP, then SIGKILL later):
                # end them now, and wait for their processes, so that no process or pipe of
                # this server outlives it.
                await asyncio.gather(*(s.abort() for s in list(self.live)))
                await self._server.wait_closed()

            try:
                asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=5)
            except Exception as e:  # stopping anyway
                log.info("SSH server close: %s", e)
        self.bridge.close()


async def start_ssh_server(
    nursery: trio.Nursery,
    data_dir: Path,
    node_id: str,
    state: Any,
    cluster: Any,
    sessions: SessionTracker,
    bind: str,
    port: int,
    host: str,
    follow: Callable[[Callable[[int], None]], None],
    secret_env: Callable[[str], Awaitable[dict[str, str]]] | None = None,
) -> tuple[str, str]:
    """This host's SSH server into its jobs, started in ``nursery`` with its host key (made once
    in ``data_dir``); ``follow`` registers its reaction to applied entries (sessions of jobs that
    ended are closed). Returns the address to advertise (``host:port``) and the host's public
    key, both for the node's record."""
    from meshgpu.security.sshkeys import load_or_create_host_key

    host_key, host_pub = load_or_create_host_key(data_dir / "ssh_host_ed25519_key")
    server = SSHServer(
        node_id=node_id,
        state=state,
        cluster=cluster,
        jobs_dir=data_dir / "jobs",
        sessions=sessions,
        host_key=host_key,
        bind=bind,
        port=port,
        secret_env=secret_env,
    )
    bound = await nursery.start(server.run)
    follow(server.notify)
    return f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}", host_pub
