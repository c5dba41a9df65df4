"""What sandbox a process job gets on this host: the policy side of ``sandbox.py``.

The agent decides it once per job (``Confinement.for_job``, in ``Executor._prepare``) and writes
it into the job's ``job.json``; the supervisor and the job's child make it (``sandbox.py``). The
protections and what each needs from the host are the table in docs/operations.md:

- **user**: process jobs run as ``--job-user`` (default ``meshgpu-job``, created by the agent at
  start with ``useradd --system`` when it is root and the user is missing), or as the run's
  ``user:`` (``name_or_id[:group_name_or_id]``, as dstack). An agent that is not root cannot
  switch users: its jobs run as itself (a ``user:`` naming someone else fails the job).
- **mount namespace** (root): private mounts per job; ``volumes:`` (instance volumes) are bind
  mounts there, ``resources.shm_size`` a tmpfs at /dev/shm, GPUs the job does not hold hidden
  behind /dev/null binds over their ``/dev/nvidiaN``.
- **PID namespace** (root, and a host that lets it unshare one and mount its /proc -- asked once,
  at agent start, in a throwaway process): each job sees and can signal only its own processes,
  not the agent's nor another job's, even one running as the same user; SSH sessions join it.
  Without it jobs run as before (``pid_ns: false`` in the node's ``sandbox``).
- **cgroups** (root; v2 when the unified hierarchy has the memory controller, else v1): memory,
  CPU quota and a pids cap per job. The scheduler reserves GPUs (and, on a host split into
  blocks, the job's blocks) but not CPU or memory on a host shared GPU by GPU, so the limits are:
  the job's share of blocks on a split host; else the upper bound of ``resources.memory`` /
  ``resources.cpu`` when there is one (``matching.py``: upper bounds "limit what a job may be
  given"), else none: ``8GB..`` (dstack's default) means *at least* 8GB, and a dstack job gets
  its whole instance, so a job asking for no top may use the host (the pids cap still holds).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from meshgpu.config.resources import ResourcesSpec, parse_resources
from meshgpu.runner import sandbox

log = logging.getLogger(__name__)

DEFAULT_JOB_USER = "meshgpu-job"
DEFAULT_WORKSPACE_DIR = Path("/var/lib/meshgpu/workspaces")
CGROUP_PARENT = "meshgpu"  # the jobs' cgroups: <hierarchy>/meshgpu/<job>


def is_root() -> bool:
    return os.geteuid() == 0


def ensure_user(name: str) -> None:
    """The job user exists: created (once, by the agent at start) when root and missing."""
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    if not is_root():
        raise RuntimeError(f"the job user {name!r} does not exist and this agent is not root")
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    cmd = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 and done.returncode != 9:  # 9: created meanwhile
        raise RuntimeError(
            f"cannot create the job user {name!r} ({' '.join(cmd)}: {done.stderr.strip()}); "
            "create it yourself or start the agent with --job-user ''"
        )
    log.info("created the job user %s", name)


@lru_cache(maxsize=1)
def probe_pid_ns() -> bool:
    """Whether this host lets the agent give each job a PID namespace with its own /proc (a
    container may refuse either): tried once in a short-lived process (``sandbox.py --probe``),
    since the namespace outlives nothing but that process."""
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", sandbox.__file__, "--probe"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("cannot tell whether jobs may have a PID namespace (%s): they get none", e)
        return False
    if done.returncode != 0:
        log.warning(
            "this host refuses a PID namespace (or its /proc) to jobs: they run without one, "
            "and can see (and, under the same user, signal) each other's processes"
        )
    return done.returncode == 0


@dataclass(frozen=True, slots=True)
class JobUser:
    uid: int
    gid: int
    name: str
    groups: tuple[int, ...]
    home: str | None  # a home directory it can use (None: its workspace is its home)

    def to_json(self) -> dict[str, Any]:
        return {"uid": self.uid, "gid": self.gid, "groups": list(self.groups), "name": self.name}


def resolve_user(text: str) -> JobUser:
    """``name_or_id[:group_name_or_id]`` on this host; ``LookupError`` saying which is missing."""
    who, _, group = str(text).partition(":")
    try:
        entry = pwd.getpwuid(int(who)) if who.isdigit() else pwd.getpwnam(who)
    except KeyError:
        if not who.isdigit():
            raise LookupError(f"user {who!r} does not exist on this host") from None
        entry = None  # a bare uid, as a container's --user may be
    uid = entry.pw_uid if entry is not None else int(who)
    name = entry.pw_name if entry is not None else who
    gid = entry.pw_gid if entry is not None else uid
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            if not group.isdigit():
                raise LookupError(f"group {group!r} does not exist on this host") from None
            gid = int(group)
    groups = tuple(os.getgrouplist(name, gid)) if entry is not None else (gid,)
    home = None
    if entry is not None and entry.pw_dir and entry.pw_dir != "/":
        try:
            st = os.stat(entry.pw_dir)
            if st.st_uid == uid and os.path.isdir(entry.pw_dir):
                home = entry.pw_dir
        except OSError:
            pass
    return JobUser(uid, gid, name, groups, home)


@lru_cache(maxsize=256)
def _resources(key: str, raw_json: str) -> ResourcesSpec:
    import json

    return parse_resources(json.loads(raw_json) or {})


def limits_for(
    resources: dict[str, Any],
    share: tuple[float, float] | None = None,
) -> tuple[int | None, float | None]:
    """(memory bytes, CPUs) the job is limited to (see the module's docstring). ``share``:
    (memory GB, CPUs) of the job's blocks on a host split into blocks."""
    if share is not None:
        mem_gb, cpus = share
        return int(mem_gb * (1 << 30)), cpus
    import json

    text = json.dumps(resources, sort_keys=True)
    res = _resources(text, text)
    # An open range (``8GB..``, dstack's default) is a floor the scheduler checked, not a cap.
    mem = res.memory.max
    cpu = res.cpu.count.max
    return (int(mem * (1 << 30)) if mem else None), (float(cpu) if cpu else None)


def describe_limits(memory_bytes: int | None, cpus: float | None, pids: int | None) -> str:
    parts = []
    if memory_bytes:
        gb = memory_bytes / (1 << 30)
        parts.append(f"memory {gb:g}GB" if gb >= 1 else f"memory {memory_bytes >> 20}MB")
    if cpus:
        parts.append(f"cpus {cpus:g}")
    if pids:
        parts.append(f"pids {pids}")
    return ", ".join(parts)


def host_volumes(volumes: tuple[Any, ...]) -> list[tuple[str, str]]:
    """(host path, job path) of each instance volume this host has; ``RuntimeError`` for one
    it lacks that is not ``optional`` (the job fails saying which)."""
    binds = []
    for v in volumes:
        src, dst = str(v.instance_path), str(v.path)
        if src.startswith("~"):
            src = os.path.expanduser(src)
        if not os.path.exists(src):
            if v.optional:
                continue
            raise RuntimeError(
                f"volumes: {src} does not exist on this host (create it, or mark the volume "
                "optional: true to run without it)"
            )
        binds.append((src, dst))
    return binds


@dataclass(frozen=True, slots=True)
class JobSandbox:
    """One job's sandbox: its JSON form for ``job.json`` and what ``ps -v`` shows of it."""

    spec: dict[str, Any] | None
    user: str | None  # who it runs as (None: the agent's user, unchanged)
    limits: str | None  # "memory 8GB, cpus 2, pids 32768" (None: no cgroup)
    env: dict[str, str]  # HOME, USER, LOGNAME for the job


class Confinement:
    """This host's sandbox policy (``meshgpu agent --job-user``, what the host supports)."""

    def __init__(
        self,
        job_user: str | None = DEFAULT_JOB_USER,
        *,
        cgroup_root: str = "/sys/fs/cgroup",
        pids_max: int = sandbox.DEFAULT_PIDS_MAX,
        dev_dir: str = "/dev",
        root: bool | None = None,
        pid_ns: bool | None = None,
    ) -> None:
        self.root = is_root() if root is None else root
        me = pwd.getpwuid(os.geteuid()).pw_name
        self.job_user = job_user if (job_user and job_user != me and self.root) else None
        found = sandbox.cgroup_version(cgroup_root) if self.root else None
        self.cgroup = found  # (version, mount) or None
        self.mount_ns = self.root and os.path.exists("/proc/self/ns/mnt")
        # A PID namespace needs the mount namespace (its own /proc); None: ask the host.
        if pid_ns is None:
            pid_ns = self.mount_ns and probe_pid_ns()
        self.pid_ns = bool(pid_ns and self.mount_ns)
        self.pids_max = pids_max
        self.dev_dir = dev_dir

    def capabilities(self) -> dict[str, Any]:
        """The node record's ``sandbox``: what this host's process jobs get."""
        return {
            "user": self.job_user,
            "cgroup": self.cgroup[0] if self.cgroup else None,
            "mount_ns": self.mount_ns,
            "pid_ns": self.pid_ns,
        }

    def prepare_host(self) -> None:
        """Once, at agent start: the job user exists."""
        if self.job_user:
            ensure_user(self.job_user)

    def for_job(
        self,
        job_id: str,
        *,
        resources: dict[str, Any],
        share: tuple[float, float] | None,
        user: str | None,
        volumes: tuple[Any, ...],
        shm_size_gb: float | None,
        gpu_indices: tuple[int, ...],
        workspace: Path,
    ) -> JobSandbox:
        """The sandbox of one process job; ``RuntimeError`` (the job fails saying it) when it
        cannot have what its configuration asks for."""
        ju: JobUser | None = None
        wanted = user or self.job_user
        if wanted:
            try:
                ju = resolve_user(wanted)
            except LookupError as e:
                raise RuntimeError(
                    f"user: {e}; create it, or run the job as another user"
                ) from None
            if ju.uid == os.geteuid():
                ju = None
            elif not self.root:
                raise RuntimeError(
                    f"user: cannot run the job as {wanted!r}: this host's agent is not root"
                )
        binds = [list(b) for b in host_volumes(volumes)]
        if (binds or shm_size_gb) and not self.mount_ns:
            raise RuntimeError(
                "volumes and shm_size need a private mount namespace, which this host's agent "
                "cannot make (it is not root)"
            )
        hide = []
        if self.mount_ns:
            held = set(gpu_indices)
            try:
                names = os.listdir(self.dev_dir)
            except OSError:
                names = []
            for name in names:
                if name.startswith("nvidia") and name[6:].isdigit() and int(name[6:]) not in held:
                    hide.append(os.path.join(self.dev_dir, name))
        cg = None
        limits = None
        if self.cgroup is not None:
            mem, cpus = limits_for(resources, share)
            version, mount = self.cgroup
            cg = {
                "version": version,
                "root": mount,
                "name": f"{CGROUP_PARENT}/{job_id}",
                "memory_bytes": mem,
                "cpu_quota_us": int(cpus * sandbox.CPU_PERIOD_US) if cpus else None,
                "cpu_period_us": sandbox.CPU_PERIOD_US,
                "pids_max": self.pids_max,
            }
            limits = describe_limits(mem, cpus, self.pids_max)
        spec: dict[str, Any] = {
            "cgroup": cg,
            "mount_ns": self.mount_ns,
            "pid_ns": self.pid_ns,
            "binds": binds,
            "shm_bytes": int(shm_size_gb * (1 << 30)) if shm_size_gb else None,
            "hide": sorted(hide),
            "user": ju.to_json() if ju else None,
        }
        env = {}
        if ju is not None:
            env = {"HOME": ju.home or str(workspace), "USER": ju.name, "LOGNAME": ju.name}
        if not (cg or self.mount_ns or ju):
            return JobSandbox(None, None, None, env)
        return JobSandbox(spec, ju.name if ju else None, limits, env)
