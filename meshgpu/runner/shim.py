"""The per-job supervisor process: it outlives the agent.

The agent starts ``python -I -S shim.py JOB_DIR`` in a new session; the shim reads
``JOB_DIR/job.json``, starts the job in its own process group, copies its output to
``JOB_DIR/output.log`` (capped), enforces ``max_duration``, handles stop requests and finally
writes ``JOB_DIR/status.json`` atomically. Because the shim -- not the agent -- is the job's
parent, an agent that is killed and restarted finds the job still running (``shim.pid``) or its
final status on disk, and re-adopts it instead of losing it.

Standard library only, and no package imports, so it starts in a few milliseconds with ``-S``.

Stop protocol: the agent writes ``stop.json`` (``{"grace_s": N, "reason": "..."}``) and sends
SIGTERM to the shim; the shim sends SIGTERM to the job's process group, then SIGKILL after the
grace period. ``grace_s: 0`` is an abort.

With a PID namespace (the sandbox's ``pid_ns``), the shim unshares it before forking: that child
is PID 1 of the job's namespace, makes the sandbox (its /proc included) and stays as the job's
minimal init (``_init``): it forks the job into its own process group -- which is what
``job.pid`` names, so the stop signals, ``max_duration`` and the per-group usage reach the job as
they did without a namespace (init catches none of them: as PID 1 it is immune to all but the
SIGKILL sent from outside, and forwarding would deliver each twice) -- reaps the orphans handed to
it, and ends with the job, passing the job's exact wait status up a pipe (a signal cannot be
reflected by a PID 1). Its end kills whatever is left in the namespace. Where the namespace cannot
be made, the job runs as without one.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import sys
import time

if __package__:
    from meshgpu.runner import sandbox
    from meshgpu.runner.masking import Masker
else:  # run as a script (python -I -S shim.py) or by the fork server: next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sandbox  # type: ignore[no-redef]  # stdlib only
    from masking import Masker  # type: ignore[no-redef]  # stdlib only

LOG_NAME = "output.log"
# The job's secrets (JSON: ``{"env": {...}, "mask": [...]}``) as they come in memory: from the
# fork server (launcher.py) or on stdin. Never on disk: ``job.json`` names the variables only.
MAX_SECRETS = 1 << 20


def _read_secrets(fd: int) -> dict | None:
    """The job's secrets from ``fd`` (read to EOF, bounded); None if they did not come whole."""
    data = b""
    while len(data) <= MAX_SECRETS:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    if len(data) > MAX_SECRETS:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: str, value: object) -> None:
    # Atomic (rename), not fsynced: these records must survive the agent, not the host -- a
    # host that reboots takes the job with it, and the leader learns that through gossip/Raft.
    tmp = path + ".tmp"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _starttime(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _yield_to_the_holder(job_dir: str, bound_s: float = 5.0) -> None:
    """Another supervisor holds the job's lock: leave only once ``shim.pid`` names someone
    else (or the job has started or ended). The agent may have recorded *this* process's pid
    there (the first answer of a repeated launch), and it reads a supervisor gone without a
    status as a job lost: lingering here until the holder has recorded its own pid closes
    that window."""
    me = os.getpid()
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if _read_json(os.path.join(job_dir, "shim.pid")).get("pid") not in (None, me):
            return
        if os.path.exists(os.path.join(job_dir, "job.pid")) or os.path.exists(
            os.path.join(job_dir, "status.json")
        ):
            return
        time.sleep(0.01)


def main(job_dir: str, secrets: dict | None = None) -> int:
    # One supervisor per job, ever: a launch repeated after a lost answer (the fork server's
    # connection broke mid-batch) finds the lock held, or the job already started, and leaves.
    lock = os.open(os.path.join(job_dir, "shim.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        _yield_to_the_holder(job_dir)
        return 0
    if os.path.exists(os.path.join(job_dir, "job.pid")):
        return 0
    me = os.getpid()
    # Which supervisor the agent must watch: this one (the agent writes the file only when it
    # is not there yet, so a repeated launch's pid never replaces this one).
    _write_json(os.path.join(job_dir, "shim.pid"), {"pid": me, "starttime": _starttime(me)})
    spec = _read_json(os.path.join(job_dir, "job.json"))
    if spec.get("secrets_in_memory") and secrets is None:
        try:
            secrets = _read_secrets(0)  # started directly: the agent writes them to our stdin
        except OSError:
            secrets = None
        if secrets is None:
            _write_json(
                os.path.join(job_dir, "status.json"),
                {
                    "exit_code": None,
                    "reason": "executor_error",
                    "message": "the job's secrets did not reach its supervisor",
                    "finished_at": time.time(),
                },
            )
            return 1
    secrets = secrets or {}
    env = {**spec.get("env", {}), **(secrets.get("env") or {})}
    log_cap = int(spec.get("log_cap_bytes", 64 << 20))
    max_duration = spec.get("max_duration_s")
    default_grace = float(spec.get("stop_grace_s", 10))
    state: dict = {"stop": None, "deadline": None, "pgid": None}

    def on_term(signum: int, frame: object) -> None:
        req = _read_json(os.path.join(job_dir, "stop.json"))
        grace = float(req.get("grace_s", default_grace))
        if state["stop"] is None:
            state["stop"] = req.get("reason", "terminated_by_user")
        if state["pgid"] is not None:
            _killpg(state["pgid"], signal.SIGKILL if grace <= 0 else signal.SIGTERM)
        dl = time.monotonic() + grace
        state["deadline"] = dl if state["deadline"] is None else min(state["deadline"], dl)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    sb = spec.get("sandbox") or {}
    cg = sb.get("cgroup")
    pid_ns = False
    if sb.get("pid_ns"):
        try:
            sandbox.unshare(sandbox.CLONE_NEWPID)  # our next child is PID 1 of the job's own
            pid_ns = True
        except OSError as e:
            os.write(2, f"meshgpu: the job runs without a PID namespace: {e}\n".encode())
    # The job's wait status, from its init (who alone can wait for it).
    status_rd, status_wr = os.pipe() if pid_ns else (-1, -1)
    rd, wr = os.pipe()
    # A sandboxed child says "in its sandbox" by exec'ing (this end is close-on-exec) or why
    # not by writing it here: job.pid means the job is inside, and a failure is the job's.
    ready_rd, ready_wr = os.pipe() if sb else (-1, -1)
    started = time.time()
    try:
        if cg:
            sandbox.cgroup_create(cg)  # here, as root: the job's child only joins them
        pid = os.fork()
    except OSError as e:
        if cg:
            sandbox.cgroup_remove(cg, timeout=0)
        _write_json(
            os.path.join(job_dir, "status.json"),
            {
                "exit_code": None,
                "reason": "executor_error",
                "message": f"the job's sandbox could not be made: {e}" if cg else str(e),
                "finished_at": time.time(),
            },
        )
        return 1
    if pid == 0:  # the job
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)  # ignored signals would survive exec
            os.setpgid(0, 0)
            os.dup2(wr, 1)
            os.dup2(wr, 2)
            os.close(rd)
            os.close(wr)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            if sb:
                os.close(ready_rd)
                try:
                    sandbox.enter(sb, pid_ns)  # cgroups, mount namespace, then the job's user
                except BaseException as e:  # noqa: BLE001
                    os.write(ready_wr, str(e).encode()[:4000] or b"?")
                    os._exit(127)
            if pid_ns:
                os.close(status_rd)
                os._exit(_init(spec, env, ready_wr, status_wr))
            os.chdir(spec["cwd"])
            os.execve(spec["argv"][0], spec["argv"], env)
        except BaseException as e:  # noqa: BLE001 - report anything, the job cannot start
            os.write(2, f"meshgpu: cannot start the job: {e}\n".encode())
            os._exit(127)
    os.close(wr)
    if pid_ns:
        os.close(status_wr)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # the child already did it (or already exited)
    if sb:
        os.close(ready_wr)
        why = b""
        while True:
            chunk = os.read(ready_rd, 4096)
            if not chunk:
                break
            why += chunk
        os.close(ready_rd)
        if why:
            os.waitpid(pid, 0)
            os.close(rd)
            if cg:
                sandbox.cgroup_remove(cg)
            _write_json(
                os.path.join(job_dir, "status.json"),
                {
                    "exit_code": None,
                    "reason": "executor_error",
                    "message": f"the job's sandbox could not be made: {why.decode(errors='replace')}",
                    "started_at": started,
                    "finished_at": time.time(),
                },
            )
            return 1
    state["pgid"] = pid
    # job.pid doubles as "ready for stop requests": the agent signals only once it exists, and
    # a request written before it is picked up here.
    # With a PID namespace, ``pid`` is the job's init (which shares the job's process group):
    # SSH sessions join the job's namespaces through it.
    _write_json(
        os.path.join(job_dir, "job.pid"),
        {"pid": pid, "pgid": pid, "started_at": started, "pid_ns": pid_ns},
    )
    if os.path.exists(os.path.join(job_dir, "stop.json")):
        on_term(signal.SIGTERM, None)

    max_deadline = time.monotonic() + float(max_duration) if max_duration else None

    written = 0
    truncated = False
    # Mode 0600, like everything in the agent's data dir (set here, not by umask: the job
    # inherits the umask).
    log_fd = os.open(os.path.join(job_dir, LOG_NAME), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    log = open(log_fd, "ab", buffering=0)  # noqa: SIM115 - closed below
    # The project secrets the job was given: masked in its log as it is written.
    masker = Masker([str(v).encode() for v in secrets.get("mask") or ()])
    eof = False
    status = None
    try:
        # Readable when the job exits: lets one select() wait for output *and* exit, no polling.
        exit_fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        exit_fd = None
    while True:
        now = time.monotonic()
        if max_deadline is not None and now >= max_deadline and state["stop"] is None:
            state["stop"] = "max_duration_exceeded"
            _killpg(pid, signal.SIGTERM)
            state["deadline"] = now + default_grace
        if state["deadline"] is not None and now >= state["deadline"]:
            _killpg(pid, signal.SIGKILL)
            state["deadline"] = None
        if status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                # The job is over; whatever it left running in its group goes with it, which
                # also closes their copies of the output pipe so we reach EOF -- and so does
                # whatever left the group but not the job's cgroups.
                _killpg(pid, signal.SIGKILL)
                if cg:
                    sandbox.cgroup_kill(cg)
        if status is not None and eof:
            break
        timeout = 0.2
        if max_deadline is not None:
            timeout = max(0.0, min(timeout, max_deadline - now))
        if state["deadline"] is not None:
            timeout = max(0.0, min(timeout, state["deadline"] - now))
        watch = [] if eof else [rd]
        if status is None and exit_fd is not None:
            watch.append(exit_fd)
        if not watch:
            time.sleep(0.02)  # no pidfd, output closed early: poll for the exit
            continue
        ready = select.select(watch, [], [], timeout)[0]
        if rd in ready:
            chunk = os.read(rd, 65536)
            if not chunk:
                eof = True
                chunk = masker.flush()
                if not chunk:
                    continue
            else:
                chunk = masker.feed(chunk)
            if written < log_cap:
                part = chunk[: log_cap - written]
                log.write(part)
                written += len(part)
                if written >= log_cap and not truncated:
                    truncated = True
                    log.write(f"\n[meshgpu: output truncated at {log_cap} bytes]\n".encode())
    if exit_fd is not None:
        os.close(exit_fd)
    log.close()
    if pid_ns:
        # The job's own status, as its init saw it; none when the init was killed (SIGKILL after
        # the grace period: the whole namespace died of it, the job included).
        got = b""
        while len(got) < 4:
            chunk = os.read(status_rd, 4 - len(got))
            if not chunk:
                break
            got += chunk
        os.close(status_rd)
        if len(got) == 4:
            status = int.from_bytes(got, "little")
    if os.WIFEXITED(status):
        code, sig = os.WEXITSTATUS(status), None
    else:
        code, sig = 128 + os.WTERMSIG(status), os.WTERMSIG(status)
    message = ""
    oom = 0
    if cg:
        oom = sandbox.oom_kills(cg)
        if not sandbox.cgroup_remove(cg):
            os.write(2, f"meshgpu: cgroups of the job left behind: {cg['name']}\n".encode())
    if state["stop"] is not None:
        reason = state["stop"]
    elif code == 0 and not oom:
        reason = "done_by_runner"
    else:
        reason = "container_exited_with_error"
    if oom:
        # dstack has no reason of its own for it: an error exit, said in the message.
        message = f"out of memory (limit {_size(cg.get('memory_bytes'))}): the kernel killed "
        message += f"{oom} of the job's processes; ask for more resources.memory"
    _write_json(
        os.path.join(job_dir, "status.json"),
        {
            "exit_code": code,
            "signal": sig,
            "reason": reason,
            "message": message,
            "oom_kills": oom,
            "started_at": started,
            "finished_at": time.time(),
            "log_truncated": truncated,
        },
    )
    return 0


def _init(spec: dict, env: dict, ready_wr: int, status_wr: int) -> int:
    """PID 1 of the job's PID namespace, already in the job's sandbox (its user, its mounts):
    fork the job, reap whatever is handed to us, and end with the job, its wait status written
    to ``status_wr`` first (the exit code is the job's, or 128 + the signal that ended it).

    Signals: the job runs in our process group, where the supervisor sends its stop signals;
    a PID 1 never gets a signal it has no handler for (SIGKILL from outside the namespace
    excepted, which kills the whole namespace), so we leave them at their defaults."""
    sandbox.set_name("meshgpu-init")
    # Nothing of the supervisor's (the job's lock, the fork server's descriptors) stays open
    # in a process that runs as the job's user.
    keep = {0, 1, 2, ready_wr, status_wr}
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            try:
                os.close(int(name))
            except OSError:
                pass  # the listing's own descriptor
    job = os.fork()
    if job == 0:
        try:
            os.chdir(spec["cwd"])
            os.execve(spec["argv"][0], spec["argv"], env)  # the record's env and the secrets
        except BaseException as e:  # noqa: BLE001 - report anything, the job cannot start
            os.write(2, f"meshgpu: cannot start the job: {e}\n".encode())
            os._exit(127)
    os.close(ready_wr)  # the job's copy closes as it execs: then the supervisor writes job.pid
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # cannot be: the job is ours until we reaped it
            return 127
        if pid == job:
            break
    try:
        os.write(status_wr, status.to_bytes(4, "little"))
    except OSError:
        pass
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _size(n: int | None) -> str:
    if not n:
        return "none"
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n}B"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
