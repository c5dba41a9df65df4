"""The nginx data plane (``meshgpu agent --data-plane nginx``): the agent drives a local nginx that
owns the API port and proxies service traffic itself, as dstack's gateway does; the embedded
ingress (``ingress.py``) stays the default and still answers whatever nginx hands the agent.

* nginx inherits the agent's listening API socket (nginx's ``NGINX`` environment variable, the
  way its binary upgrade passes sockets): the port is bound once, by the agent, before anything
  else, and stays bound while nginx restarts -- connections wait in its backlog meanwhile.
* The agent's own server (hypercorn) listens on a unix socket in nginx's directory (0700): only
  nginx reaches it, so the client address nginx sends along (``X-Meshgpu-Client``) is believed
  there and nowhere else -- the ingress's per-IP rate limits and X-Forwarded-For see the real
  client.
* The configuration (``nginx_conf.py``) is re-rendered from the routes after applied entries
  (debounced, 100 ms); written atomically and the master sent SIGHUP only when the text changed.
  A replica dropped from an upstream: the old workers close their idle keep-alive connections to
  it and exit once their requests finish (``worker_shutdown_timeout`` bounds them), so the host
  that drains it sees its connections go.
* Supervision: one master in its own process group (its workers with it); restarted when it
  dies (its orphaned workers killed first); stopped with the agent (SIGTERM, then SIGKILL), and
  killed by the kernel if the agent dies (``PR_SET_PDEATHSIG``); a stale one left by a crashed
  agent is found through its pid file and stopped before the API port is bound.
* Counting: nginx writes one line per proxied request (service id, status, seconds) to an access
  log with a 64 KiB buffer flushed every second; the agent reads it off the event loop and feeds
  the one ``ServiceCounters`` (the autoscaler's completed requests) and the ingress metrics.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import logging
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from meshgpu.services.answers import respond
from meshgpu.services.nginx_conf import (
    AUTH_PATH,
    FRONT_CLIENT,
    FRONT_SCHEME,
    Plane,
    render,
    service_id,
)

if TYPE_CHECKING:
    from meshgpu.services.ingress import Ingress

log = logging.getLogger(__name__)

Scope = dict[str, Any]
App = Callable[[Scope, Any, Any], Awaitable[None]]
DEBOUNCE_S = 0.1
TAIL_S = 0.5
ROTATE_AT = 32 << 20  # bytes of access log before it is rotated
ROTATE_WAIT_S = 3.0  # a rotated log is read to its end this long after nginx reopened its logs
START_TIMEOUT_S = 10.0
STOP_GRACE_S = 3.0
NOT_COUNTED = frozenset({401, 403, 413, 429})  # refused before a replica was asked
_FRONT_CLIENT = FRONT_CLIENT.lower().encode()
_FRONT_SCHEME = FRONT_SCHEME.lower().encode()


class NginxError(RuntimeError):
    """nginx is missing, or would not start (the message says why)."""


def find_nginx() -> str | None:
    """The nginx binary: on PATH, or where Debian puts it (/usr/sbin is off a user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


MISSING = (
    "--data-plane nginx needs an nginx binary, and none was found on PATH or in /usr/sbin: "
    "install one (apt-get install nginx-light) or use --data-plane embedded (the default)"
)


def stop_stale(prefix: Path) -> bool:
    """Stop an nginx a crashed agent left behind in ``prefix`` (its pid file names it; it is ours
    when its command line names our configuration). True when one was stopped."""
    pid_file = prefix / "nginx.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    try:  # nginx rewrites its title: "nginx: master process /usr/sbin/nginx -p ... -c ..."
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        pid_file.unlink(missing_ok=True)
        return False
    if b" -c " + str(prefix / "nginx.conf").encode() not in cmdline:
        return False
    log.warning("stopping nginx %d left behind by an earlier agent", pid)
    _kill_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    _kill_group(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort: the pid file covers the rest
        pass


def private_socket(path: Path) -> socket.socket:
    """The agent's listening unix socket for nginx (in a 0700 directory)."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def front(app: App, ingress: Ingress) -> App:
    """The agent's app as nginx reaches it: the client's address and scheme from nginx's
    headers (only nginx can connect), and the ``auth_request`` verdicts."""

    async def asgi(scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            headers = []
            client = scheme = None
            for k, v in scope["headers"]:
                if k == _FRONT_CLIENT:
                    client = v.decode("latin-1")
                elif k == _FRONT_SCHEME:
                    scheme = v.decode("latin-1")
                else:
                    headers.append((k, v))
            scope = dict(scope, headers=headers, client=(client, 0) if client else None)
            if scheme == "https":
                scope["scheme"] = "wss" if kind == "websocket" else "https"
            elif scheme == "http":
                scope["scheme"] = "ws" if kind == "websocket" else "http"
            if kind == "http" and scope["path"] == AUTH_PATH:
                await _verdict(ingress, scope, send)
                return
        await app(scope, receive, send)

    return asgi


async def _verdict(ingress: Ingress, scope: Scope, send: Any) -> None:
    """200 when the bearer token may use the project's services, else 401 (nginx answers the
    client with the JSON problem the embedded ingress gives)."""
    project = "main"
    for part in scope.get("query_string", b"").decode("latin-1").split("&"):
        key, _, value = part.partition("=")
        if key == "project" and value:
            project = value
    ok = ingress.authorized(scope, project)
    await respond(scope, send, 200 if ok else 401, b"", b"text/plain")


class NginxPlane:
    """One nginx master serving the API port for this agent: configuration, supervision,
    reloads, and the access log fed back into the ingress's counters."""

    def __init__(
        self,
        binary: str,
        prefix: Path,
        ingress: Ingress,
        *,
        tls: tuple[Path, Path] | None = None,
        domain: str | None = None,
        workers: int = 1,
    ) -> None:
        self.binary = binary
        self.prefix = prefix
        self.ingress = ingress
        self.tls = tls
        self.domain = domain
        self.workers = workers
        self.conf_path = prefix / "nginx.conf"
        self.socket_path = prefix / "agent.sock"
        self.log_path = prefix / "access.log"
        self.reloads = 0  # SIGHUPs sent (tests wait on it)
        self.starts = 0  # masters started
        self.text = ""
        self._plane: Plane | None = None
        self._changed = trio.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._up = False  # the master's signal handlers are in place (its pid file written)
        self._sids: dict[str, tuple[str, str, str]] = {}  # sid -> run id, project, run name
        self._partial = b""

    # -- setup ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        self.prepare_dir(self.prefix)

    @staticmethod
    def prepare_dir(prefix: Path) -> None:
        """nginx's directory (0700) and a stale master stopped: before the API port is bound."""
        for sub in ("", "tmp", "cache"):
            (prefix / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(prefix, 0o700)
        stop_stale(prefix)
        log_path = prefix / "access.log"
        log_path.unlink(missing_ok=True)  # counted by the agent that wrote it
        log_path.with_suffix(".old").unlink(missing_ok=True)

    def agent_socket(self) -> socket.socket:
        return private_socket(self.socket_path)

    def _plane_for(self, api: socket.socket) -> Plane:
        host, port = api.getsockname()[:2]
        dual = False
        if api.family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                dual = api.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
            listen = f"[{host}]:{port}"
        else:
            listen = f"{host}:{port}"
        user = None
        if os.geteuid() == 0:
            user = f"{pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name}"
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nofile = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
        return Plane(
            prefix=str(self.prefix),
            listen=listen,
            agent_socket=str(self.socket_path),
            access_log=str(self.log_path),
            tls=(str(self.tls[0]), str(self.tls[1])) if self.tls else None,
            domain=self.domain,
            workers=self.workers,
            user=user,
            nofile=nofile,
            worker_connections=max(1024, min(16384, nofile // 2)),
            dual_stack=dual,
        )

    # -- configuration -------------------------------------------------------------------------
    def notify(self, _index: int = 0) -> None:
        """The state moved on: the routes may have changed."""
        self._changed.set()

    def render(self) -> str:
        assert self._plane is not None
        table = self.ingress.routes
        routes = []
        for run in list(table.state.runs.values()):
            if run.spec.service is None or run.status.is_finished():
                continue
            route = table.get(run.project, run.run_name)
            if route is not None:
                routes.append(route)
                self._sids[service_id(route.run_id)] = (
                    route.run_id,
                    route.project,
                    route.run_name,
                )
        return render(self._plane, routes)

    def _write(self, text: str) -> None:
        tmp = self.conf_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.conf_path)
        self.text = text

    async def _reloads(self) -> None:
        while True:
            await self._changed.wait()
            await trio.sleep(DEBOUNCE_S)
            self._changed = trio.Event()
            text = self.render()
            if text == self.text:
                continue
            self._write(text)
            while not self._up:  # a SIGHUP before nginx handles it would end it
                await trio.sleep(0.05)
            proc = self._proc
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGHUP)
                self.reloads += 1
                log.info("nginx: configuration reloaded (%d services)", text.count("upstream s"))

    # -- the master ----------------------------------------------------------------------------
    def _spawn(self, api: socket.socket) -> subprocess.Popen[bytes]:
        fd = api.fileno()
        # nginx takes an inherited socket as it is (its own old master made it non-blocking):
        # a blocking one would hold a worker in accept().
        os.set_blocking(fd, False)
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TZ")}
        env["NGINX"] = f"{fd};"  # nginx takes it as an inherited listening socket
        # What nginx says before its error_log is open (a configuration it cannot read).
        with open(self.prefix / "stderr.log", "wb") as stderr:
            proc = self._popen(fd, env, stderr)
        self.starts += 1
        return proc

    def _popen(self, fd: int, env: dict[str, str], stderr: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [self.binary, "-p", str(self.prefix), "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=(fd,),
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    async def _started(self, proc: subprocess.Popen[bytes]) -> None:
        """Until the master wrote its pid file (configuration read, sockets taken)."""
        pid_file = self.prefix / "nginx.pid"
        deadline = trio.current_time() + START_TIMEOUT_S
        while trio.current_time() < deadline:
            if proc.poll() is not None:
                raise NginxError(f"nginx would not start: {self.error_tail()}")
            with contextlib.suppress(OSError, ValueError):
                if int(pid_file.read_text().strip()) == proc.pid:
                    return
            await trio.sleep(0.02)
        raise NginxError(f"nginx did not start within {START_TIMEOUT_S:g} s: {self.error_tail()}")

    def error_tail(self, lines: int = 5) -> str:
        said = []
        for name in ("stderr.log", "error.log"):
            with contextlib.suppress(OSError):
                said += (self.prefix / name).read_text(errors="replace").strip().splitlines()
        return " | ".join(said[-lines:]) or "(nginx said nothing)"

    async def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        with trio.CancelScope(shield=True):
            _kill_group(proc.pid, signal.SIGTERM)
            deadline = trio.current_time() + STOP_GRACE_S
            while proc.poll() is None and trio.current_time() < deadline:
                await trio.sleep(0.02)
            _kill_group(proc.pid, signal.SIGKILL)  # the master if it lingers, orphaned workers
            if proc.poll() is None:
                await trio.to_thread.run_sync(proc.wait)

    async def _wait_exit(self, proc: subprocess.Popen[bytes]) -> int:
        try:
            fd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            while proc.poll() is None:
                await trio.sleep(0.2)
            return proc.returncode
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)
        return proc.wait()

    async def run(
        self, api: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve ``api`` (a listening socket, kept open here) through nginx until cancelled."""
        self._plane = self._plane_for(api)
        self._write(self.render())
        proc = self._proc = self._spawn(api)
        try:
            await self._started(proc)
        except BaseException:
            await self._stop(proc)
            raise
        self._up = True
        log.info("nginx %d serves %s (data plane)", proc.pid, self._plane.listen)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reloads)
            nursery.start_soon(self._tail)
            task_status.started()
            backoff = 0.2
            try:
                while True:
                    code = await self._wait_exit(proc)
                    self._up = False
                    _kill_group(proc.pid, signal.SIGKILL)  # its orphaned workers
                    log.warning(
                        "nginx exited (%s): restarting in %.1f s; %s",
                        code,
                        backoff,
                        self.error_tail(2),
                    )
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    self._write(self.render())
                    proc = self._proc = self._spawn(api)
                    with contextlib.suppress(NginxError):
                        await self._started(proc)
                        self._up = True
                        backoff = 0.2
            finally:
                await self._stop(proc)

    # -- counting ------------------------------------------------------------------------------
    async def _tail(self) -> None:
        reader = _LogReader(self.log_path, lambda: self._proc)
        try:
            while True:
                await trio.sleep(TAIL_S)
                data = await trio.to_thread.run_sync(reader.read)
                if data:
                    self.feed(data)
        finally:
            reader.close()

    def feed(self, data: bytes) -> None:
        """Access log lines (``<sid> <status> <seconds>``) into the counters and metrics."""
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        counters, metrics = self.ingress.counters, self.ingress.metrics
        completed: dict[str, int] = {}
        for line in lines:
            parts = line.split()
            if len(parts) != 3:
                continue
            known = self._sids.get(parts[0].decode("latin-1"))
            if known is None:
                continue
            try:
                status, seconds = int(parts[1]), float(parts[2])
            except ValueError:
                continue
            run_id, project, run_name = known
            if status not in (401, 403):
                metrics.observe(project, run_name, status, seconds)
            if status not in NOT_COUNTED:
                completed[run_id] = completed.get(run_id, 0) + 1
        for run_id, n in completed.items():
            counters.completed(run_id, n)


class _LogReader:
    """Reads what nginx appended to the access log since the last call (in a worker thread);
    rotates it past ``ROTATE_AT``: renamed, nginx told to reopen its logs (SIGUSR1), the old file
    read to its end once nginx flushed into it for the last time."""

    def __init__(self, path: Path, proc: Callable[[], subprocess.Popen[bytes] | None]) -> None:
        self.path = path
        self.proc = proc
        self.f: Any = None
        self.rotated_at: float | None = None

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def read(self) -> bytes:
        if self.f is None:
            try:
                self.f = open(self.path, "rb")  # noqa: SIM115 - held across calls
            except FileNotFoundError:
                return b""
        data = self.f.read()
        now = time.monotonic()
        if self.rotated_at is not None:
            if now - self.rotated_at >= ROTATE_WAIT_S:
                data += self.f.read()
                self.f.close()
                self.f = None
                self.rotated_at = None
                self.path.with_suffix(".old").unlink(missing_ok=True)
            return data
        if os.fstat(self.f.fileno()).st_size > ROTATE_AT:
            proc = self.proc()
            if proc is not None and proc.poll() is None:
                os.replace(self.path, self.path.with_suffix(".old"))
                os.kill(proc.pid, signal.SIGUSR1)
                self.rotated_at = now
        return data


__all__ = ["MISSING", "NginxError", "NginxPlane", "find_nginx", "front", "stop_stale"]
