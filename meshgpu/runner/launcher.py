"""A fork server for job supervisors: starting a Python interpreter per job costs ~20 ms of CPU;
forking one that is already running costs ~1 ms.

The agent starts ``python -I -S launcher.py DIR`` once, in its own session (so it survives the
agent like the jobs do). It listens on ``DIR/launcher-2.sock``; each request is a line: a job
directory, or a JSON object ``{"dir": DIR, "secrets": {"env": {...}, "mask": [...]}}`` (the job's
secret values, which never touch the disk: the forked supervisor gets them in memory), and the
launcher forks a child that becomes that job's supervisor (``shim.main``) and answers with the
child's pid (or ``{"error": ...}``). A request is at most ``MAX_REQUEST`` bytes. Supervisors started this way are exactly those started directly: their state lives in
the job directory, and the agent watches them through pidfds. The launcher reaps its children and
exits after ``IDLE_EXIT_S`` with no supervisor left and no request.

Standard library only, like the shim.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shim  # noqa: E402 - next to this file; stdlib only

IDLE_EXIT_S = 600.0
SOCK = "launcher-2.sock"  # process.py's LAUNCHER_SOCK: the request format's version
MAX_REQUEST = shim.MAX_SECRETS + 8192  # the secrets, the directory and the JSON around them


def _request(line: bytes) -> tuple[str, dict | None]:
    """A request line: (job directory, its secrets or None). ValueError if malformed."""
    if not line.startswith(b"{"):
        return line.decode(), None
    req = json.loads(line)
    if not isinstance(req, dict) or not isinstance(req.get("dir"), str):
        raise ValueError('a request object needs its job directory as "dir"')
    secrets = req.get("secrets")
    if secrets is not None and not isinstance(secrets, dict):
        raise ValueError('"secrets" must be an object')
    return req["dir"], secrets


def _reap(children: set[int]) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)


def _spawn(
    job_dir: str, listener: socket.socket, conn: socket.socket, secrets: dict | None = None
) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            listener.close()
            conn.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the shim waits for its own child
            err = os.open(
                os.path.join(job_dir, "shim.err"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
            )
            os.dup2(err, 2)
            os.close(err)
            code = shim.main(job_dir, secrets)
        except BaseException:  # noqa: BLE001 - a supervisor must never fall back into the server
            code = 1
        os._exit(code)
    return pid


def serve(directory: str) -> int:
    # Daemonize: the agent waits for this first process to exit, so no zombie is left behind and
    # the launcher belongs to no one (like the jobs, it must outlive an agent that is killed).
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    path = os.path.join(directory, SOCK)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    pid_tmp = os.open(
        os.path.join(directory, "launcher.pid.tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
    )
    with open(pid_tmp, "w") as f:
        json.dump({"pid": os.getpid()}, f)
    os.replace(os.path.join(directory, "launcher.pid.tmp"), os.path.join(directory, "launcher.pid"))
    children: set[int] = set()
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wake select; reaping happens in the loop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    idle_since = time.monotonic()
    while True:
        _reap(children)
        if children:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > IDLE_EXIT_S:
            break
        if not sel.select(timeout=5.0):
            continue
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(1.0)
            buf = b""
            while True:
                _reap(children)
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue  # the agent holds the connection open between launches
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        job_dir, secrets = _request(line)
                        pid = _spawn(job_dir, listener, conn, secrets)
                        children.add(pid)
                        reply = {"pid": pid}
                    except (OSError, ValueError) as e:
                        reply = {"error": str(e)}
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                if len(buf) > MAX_REQUEST:  # bounded: a request that never ends is refused
                    msg = f"a request is at most {MAX_REQUEST} bytes"
                    conn.sendall(json.dumps({"error": msg}).encode() + b"\n")
                    break
            idle_since = time.monotonic()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
