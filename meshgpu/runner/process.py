"""Runs jobs on this host as supervised processes that outlive the agent (see ``shim.py``).

``ProcessRunner.start`` prepares ``<jobs_dir>/<job_id>/`` (the record: ``job.json``, the working
directory, the MPI hostfile) and launches the shim in a new session. ``wait`` returns the final
status; ``stop`` asks for a graceful stop or an abort. ``adopt`` (called once when the agent
starts) finds every job a previous agent process started: running ones are watched again, ended
ones report the status their shim recorded, and a shim that vanished without a status (host
reboot, OOM kill) is reported as lost rather than forgotten.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from meshgpu.datadir import open_private, private_dir
from meshgpu.runner import sandbox
from meshgpu.runner.jobenv import command_argv

log = logging.getLogger(__name__)
SHIM = Path(__file__).with_name("shim.py")
LAUNCHER = Path(__file__).with_name("launcher.py")
# launcher.py's socket (its request format's version is in the name: a fork server left running
# by an older agent answers on the old name and leaves on its own when idle).
LAUNCHER_SOCK = "launcher-2.sock"
DEFAULT_LOG_CAP = 64 << 20
# The job's secrets as they reach its supervisor in memory (JSON): launcher.py and shim.py
# refuse more (MAX_SECRETS there).
MAX_SECRETS_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class JobLaunch:
    """Everything the shim needs; written to ``job.json`` -- but for ``secret_env`` and
    ``mask``: secret values never touch the disk. They reach the supervisor in memory (the fork
    server's request, or a pipe on its stdin), and ``job.json`` names only the variables."""

    job_id: str
    commands: tuple[str, ...]
    env: dict[str, str]
    shell: str = "/bin/sh"
    max_duration_s: int | None = None
    stop_grace_s: float = 10.0
    log_cap_bytes: int = DEFAULT_LOG_CAP
    epoch: int = 0  # the assignment this process serves; a restarted agent reads it back
    argv: tuple[str, ...] | None = None  # instead of ``shell -c commands`` (e.g. a container)
    # The job's sandbox (meshgpu/runner/sandbox.py's JSON form; None: none): its cgroups, mount
    # namespace, volumes and user, made by the supervisor and the job's child.
    sandbox: dict[str, Any] | None = None
    # Values masked in the job's log (its project secrets), by the supervisor as it writes.
    mask: tuple[str, ...] = ()
    # The job's environment variables whose values came from its project secrets (``env`` holds
    # the others): the supervisor adds them when it starts the job.
    secret_env: dict[str, str] = field(default_factory=dict)

    def secrets_payload(self) -> bytes | None:
        """What the supervisor gets in memory (JSON), or None when the job has no secrets.
        ValueError past MAX_SECRETS_BYTES."""
        if not self.secret_env and not self.mask:
            return None
        data = json.dumps({"env": self.secret_env, "mask": list(self.mask)}).encode()
        if len(data) > MAX_SECRETS_BYTES:
            raise ValueError(
                f"the job's secrets take {len(data)} bytes, over the {MAX_SECRETS_BYTES} a job's "
                "supervisor accepts: reference fewer or smaller secrets in env/registry_auth"
            )
        return data


@dataclass(frozen=True, slots=True)
class JobResult:
    job_id: str
    exit_code: int | None
    reason: (
        str  # dstack's JobTerminationReason names: done_by_runner, container_exited_with_error, ...
    )
    started_at: float | None = None
    finished_at: float | None = None
    signal: int | None = None
    log_truncated: bool = False
    message: str = ""


def _proc_starttime(pid: int) -> int | None:
    """Kernel start time of ``pid`` (clock ticks since boot): tells a live shim from a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None  # exited, not yet reaped by its parent: as good as gone
    return int(fields[19])


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, mode 0600 (like everything in the data dir)."""
    with os.fdopen(open_private(path), "w") as f:
        f.write(text)


def _feed(pipe: Any, data: bytes) -> None:
    """Write the job's secrets to its supervisor's stdin and close it (worker thread). A
    supervisor that left at once (the job already has one) reads nothing: that is fine."""
    try:
        with pipe:
            pipe.write(data)
    except BrokenPipeError:
        pass


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def give_tree(root: Path, uid: int, gid: int, budget: int | None = None) -> bool:
    """``root`` and everything under it owned by ``uid:gid`` (links themselves, not targets);
    ``root`` mode 0700. With a ``budget``, gives up (False) past that many entries: the
    caller finishes the walk in a worker thread (a small tree costs less than the hop)."""
    os.chown(root, uid, gid)
    os.chmod(root, 0o700)
    n = 0
    for top, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(os.path.join(top, name), uid, gid)
            n += 1
            if budget is not None and n > budget:
                return False
    return True


class ProcessRunner:
    """``workspace_dir``: where jobs' workspaces go (``<workspace_dir>/<job>``; see
    ``work_dir``); None keeps them in the job's record directory (``<jobs>/<job>/work``), which
    only a job running as the agent's own user can reach."""

    def __init__(
        self,
        jobs_dir: str | Path,
        *,
        use_launcher: bool = True,
        workspace_dir: str | Path | None = None,
    ) -> None:
        self.jobs_dir = Path(jobs_dir)
        private_dir(self.jobs_dir)
        self.workspace_dir = Path(workspace_dir) if workspace_dir is not None else None
        if self.workspace_dir is not None:
            # Traversable (o+x) but not listable: a job finds its own workspace, not others'.
            self.workspace_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.workspace_dir, 0o711)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self.use_launcher = use_launcher
        self._launcher: tuple[trio.SocketStream, bytearray] | None = None
        self._launch_lock = trio.Lock() if use_launcher else None
        self._launch_waiting: list[dict[str, Any]] = []

    def job_dir(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"invalid job id {job_id!r}")
        return self.jobs_dir / job_id

    def job_root(self, job_id: str) -> Path:
        """What the job itself owns on this host: its workspace (``work/``), MPI hostfile and
        whatever else is made for it (a virtual environment): ``<workspace_dir>/<job>`` (the
        job user's, 0700), or the job's record directory without a ``workspace_dir``."""
        if self.workspace_dir is not None:
            return self.workspace_dir / self.job_dir(job_id).name
        return self.job_dir(job_id)

    def work_dir(self, job_id: str) -> Path:
        """The job's workspace (its code, repo, files; where its commands start): the one
        place every part of the agent learns where it is."""
        return self.job_root(job_id) / "work"

    def hostfile_path(self, job_id: str) -> Path:
        return self.job_root(job_id) / "mpi_hostfile"

    def log_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "output.log"

    def prepare(self, job_id: str, hostfile: str = "") -> Path:
        """Create the job's directory (and workspace); returns the workspace so the caller can
        unpack the user's code into it before ``start``."""
        d = self.job_dir(job_id)
        if (d / "job.json").exists():
            raise FileExistsError(f"job {job_id} already exists on this host")
        # Private (0700/0600) like the whole data dir; the workspace too (``start`` gives it
        # to the job's user): nobody else may read the job's output, config or code.
        private_dir(d)
        work = private_dir(private_dir(self.job_root(job_id)) / "work")
        _write_private(self.hostfile_path(job_id), hostfile)
        return work

    async def start(self, launch: JobLaunch) -> None:
        d = self.job_dir(launch.job_id)
        private_dir(d)
        root = self.job_root(launch.job_id)
        work = private_dir(private_dir(root) / "work")
        user = (launch.sandbox or {}).get("user")
        # Everything placed for the job so far (code, repo, files, hostfile) is its user's.
        if user and root != d and not give_tree(root, user["uid"], user["gid"], budget=64):
            await trio.to_thread.run_sync(give_tree, root, user["uid"], user["gid"])
        argv = list(launch.argv) if launch.argv else command_argv(launch.shell, launch.commands)
        secrets = launch.secrets_payload()
        overlap = set(launch.secret_env) & set(launch.env)
        if overlap:
            raise ValueError(f"secret variables also in the job's plain env: {sorted(overlap)}")
        record = asdict(launch) | {"argv": argv, "cwd": str(work)}
        del record["mask"]
        # Names only: the supervisor has the values in memory (and so does the agent, for SSH
        # sessions; a restarted agent asks a voter again: Executor.session_secrets).
        record["secret_env"] = sorted(launch.secret_env)
        record["secrets_in_memory"] = secrets is not None  # the supervisor waits for them
        _write_private(d / "job.json", json.dumps(record))
        pid = await self._launch_via_launcher(d, secrets) if self.use_launcher else None
        if pid is None:
            with os.fdopen(open_private(d / "shim.err"), "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(SHIM), str(d)],
                    start_new_session=True,  # the agent's death (or its Ctrl-C) must not reach the job
                    stdin=subprocess.DEVNULL if secrets is None else subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    close_fds=True,
                )
            # Kept so ``wait`` can reap it: a shim must not linger as a zombie under the agent.
            self._children[launch.job_id] = proc
            pid = proc.pid
            if secrets is not None:
                assert proc.stdin is not None
                # In a worker thread: the pipe holds 64 KiB, the rest waits for the shim to read.
                await trio.to_thread.run_sync(_feed, proc.stdin, secrets)
        # The shim is our child only until the agent restarts; track it by pid + start time.
        # Unless the supervisor wrote it first (it does, once it holds the job's lock): the
        # file names the one supervisor of the job, never a repeated launch that left at once.
        tmp = d / f"shim.pid.{pid}"
        _write_private(tmp, json.dumps({"pid": pid, "starttime": _proc_starttime(pid)}))
        try:
            os.link(tmp, d / "shim.pid")
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)

    async def _launch_via_launcher(self, job_dir: Path, secrets: bytes | None = None) -> int | None:
        """Ask the fork server for a supervisor; None if it cannot be had (then spawn directly).

        Requests are combined: whoever holds the connection sends every request waiting at that
        moment and reads all their replies, so eight jobs assigned at once cost one round trip
        instead of eight in a row."""
        assert self._launch_lock is not None
        # A request is a line: the job directory, or a JSON object with its secrets
        # (``{"dir": ..., "secrets": {"env": {...}, "mask": [...]}}``: the fork server hands
        # them to the supervisor it forks, in memory).
        if secrets is None:
            request = str(job_dir).encode() + b"\n"
        else:
            request = b'{"dir": %s, "secrets": %s}\n' % (json.dumps(str(job_dir)).encode(), secrets)
        slot: dict[str, Any] = {"request": request, "done": False, "pid": None}
        self._launch_waiting.append(slot)
        async with self._launch_lock:
            if slot["done"]:
                return slot["pid"]
            batch, self._launch_waiting = self._launch_waiting, []
            for _ in range(2):
                try:
                    stream, buf = await self._launcher_conn()
                    await stream.send_all(b"".join(s["request"] for s in batch))
                    for s in batch:
                        while b"\n" not in buf:
                            chunk = await stream.receive_some(65536)
                            if not chunk:
                                raise OSError("launcher closed the connection")
                            buf += chunk
                        line, _, rest = bytes(buf).partition(b"\n")
                        buf[:] = rest
                        reply = json.loads(line)
                        if "pid" not in reply:
                            log.warning("launcher refused: %s", reply.get("error"))
                        s["pid"], s["done"] = reply.get("pid"), True
                    return slot["pid"]
                except (OSError, trio.BrokenResourceError, ValueError) as e:
                    log.info("launcher unavailable (%s); restarting it", e)
                    await self._drop_launcher()
                    batch = [s for s in batch if not s["done"]]
            for s in batch:
                s["done"] = True  # the callers spawn their supervisors directly
        return slot["pid"]

    async def _launcher_conn(self) -> tuple[trio.SocketStream, bytearray]:
        if self._launcher is not None:
            return self._launcher
        sock = self.jobs_dir / LAUNCHER_SOCK
        try:
            stream = await trio.open_unix_socket(str(sock))
        except OSError:
            # It daemonizes: this returns as soon as the first process exits.
            await trio.run_process(
                [sys.executable, "-I", "-S", str(LAUNCHER), str(self.jobs_dir)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            with trio.fail_after(10):
                while True:
                    try:
                        stream = await trio.open_unix_socket(str(sock))
                        break
                    except OSError:
                        await trio.sleep(0.005)
        self._launcher = (stream, bytearray())
        return self._launcher

    async def _drop_launcher(self) -> None:
        if self._launcher is not None:
            with trio.CancelScope(shield=True):
                await self._launcher[0].aclose()
            self._launcher = None

    async def aclose(self, stop_launcher: bool = True) -> None:
        """Let go of the launcher; stop it too unless told otherwise. Running jobs are not
        affected either way: their supervisors are separate processes."""
        await self._drop_launcher()
        if stop_launcher:
            info = _read_json(self.jobs_dir / "launcher.pid")
            if info:
                try:
                    os.kill(int(info["pid"]), signal.SIGTERM)
                except (ProcessLookupError, PermissionError, ValueError, KeyError):
                    pass

    async def __aenter__(self) -> ProcessRunner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _shim_alive(self, job_id: str) -> int | None:
        info = _read_json(self.job_dir(job_id) / "shim.pid")
        if not info:
            return None
        pid = info["pid"]
        child = self._children.get(job_id)
        if child is not None and child.poll() is not None:
            return None
        start = _proc_starttime(pid)
        if start is None or (info.get("starttime") is not None and start != info["starttime"]):
            return None
        return pid

    def result(self, job_id: str) -> JobResult | None:
        """The final status, if the job has ended (None while it runs)."""
        d = self.job_dir(job_id)
        st = _read_json(d / "status.json")
        if st is not None:
            return JobResult(
                job_id=job_id,
                exit_code=st.get("exit_code"),
                reason=st.get("reason", "executor_error"),
                started_at=st.get("started_at"),
                finished_at=st.get("finished_at"),
                signal=st.get("signal"),
                log_truncated=bool(st.get("log_truncated")),
                message=st.get("message", ""),
            )
        if self._shim_alive(job_id) is None and (d / "shim.pid").exists():
            # Re-check: the shim may have written its status between our two reads.
            st = _read_json(d / "status.json")
            if st is not None:
                return self.result(job_id)
            self._remove_cgroups(job_id)  # its supervisor is not there to do it
            return JobResult(
                job_id,
                None,
                "executor_error",
                message="the job's supervisor vanished without a status",
            )
        return None

    async def wait(self, job_id: str, poll_s: float = 0.05) -> JobResult:
        """Wait for the job to end. Uses a pidfd (works for shims we did not start) and falls
        back to polling where pidfds are unavailable."""
        while True:
            res = self.result(job_id)
            if res is not None:
                child = self._children.pop(job_id, None)
                if child is not None:
                    child.poll()
                return res
            pid = self._shim_alive(job_id)
            if pid is None:
                await trio.sleep(poll_s)
                continue
            try:
                fd = os.pidfd_open(pid)
            except (OSError, AttributeError):
                await trio.sleep(poll_s)
                continue
            try:
                with trio.move_on_after(5):  # bounded, in case the pid was reused under us
                    await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
            child = self._children.get(job_id)
            if child is not None:
                child.poll()

    def stop(self, job_id: str, grace_s: float, reason: str = "terminated_by_user") -> bool:
        """Ask the job to stop: SIGTERM, then SIGKILL after ``grace_s`` (0 = abort now).
        Returns False if it had already ended."""
        d = self.job_dir(job_id)
        pid = self._shim_alive(job_id)
        if pid is None and not (
            (d / "job.json").exists()
            and not (d / "shim.pid").exists()
            and not (d / "status.json").exists()
        ):
            return False
        # Alive, or still being launched (its record is written, its pid not yet): the request
        # is left where the supervisor looks once it is ready, and signalled when it can be.
        tmp = d / "stop.json.tmp"
        _write_private(tmp, json.dumps({"grace_s": grace_s, "reason": reason}))
        os.replace(tmp, d / "stop.json")
        if pid is None or not (d / "job.pid").exists():
            return True  # the shim is still starting; it reads stop.json once it is ready
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True

    def adopt(self) -> list[str]:
        """Job ids found on disk from earlier agent processes, running or ended but unreported."""
        found = []
        for d in sorted(self.jobs_dir.iterdir()):
            if (d / "job.json").exists() and not (d / "reported").exists():
                found.append(d.name)
        return found

    def mark_reported(self, job_id: str) -> None:
        """The final status is committed: adoption after a restart need not report it again.
        A job that failed before its directory was made (its code never came) has nothing to
        mark."""
        d = self.job_dir(job_id)
        if d.is_dir():
            (d / "reported").touch(mode=0o600)

    def remove(self, job_id: str) -> None:
        """Delete an ended job's files (logs included)."""
        if self.result(job_id) is None:
            raise RuntimeError(f"job {job_id} is still running")
        self.delete_files(job_id)

    def _remove_cgroups(self, job_id: str) -> None:
        cg = ((_read_json(self.job_dir(job_id) / "job.json") or {}).get("sandbox") or {}).get(
            "cgroup"
        )
        if cg:
            sandbox.cgroup_remove(cg, timeout=0.5)

    def delete_files(self, job_id: str) -> None:
        """The job's record directory and its workspace, gone (the caller knows it ended)."""
        self._remove_cgroups(job_id)
        shutil.rmtree(self.job_root(job_id), ignore_errors=True)
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
