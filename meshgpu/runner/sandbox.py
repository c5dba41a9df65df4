"""The process-job sandbox's mechanisms: cgroups, a private mount namespace, the job user.

Standard library only, no package imports: the job supervisor (``shim.py``, forked by the
fork server ``launcher.py``) imports it by file, next to itself. Nothing here spawns a process:
the work happens in the supervisor (cgroups) and in the job's own forked child (namespace,
mounts, privileges), so a sandboxed start costs a few system calls, not an ``unshare`` or a
``useradd`` per job (the agent creates the job user once, at start: ``meshgpu/runner/confine.py``).

The sandbox of a job is a JSON object in its ``job.json`` (``"sandbox"``; absent: none)::

    {"cgroup": {"version": "v1"|"v2", "root": "/sys/fs/cgroup", "name": "meshgpu/<job>",
                "memory_bytes": N|null, "cpu_quota_us": N|null, "cpu_period_us": 100000,
                "pids_max": N|null},            # or null: no cgroup
     "mount_ns": true,                           # a private mount namespace
     "pid_ns": true,                             # a PID namespace (needs mount_ns: its /proc)
     "binds": [["/host/src", "/job/dst"], ...],  # instance volumes (bind mounts)
     "shm_bytes": N|null,                        # tmpfs at /dev/shm of that size
     "hide": ["/dev/nvidia1", ...],              # /dev/null bound over them
     "user": {"uid": N, "gid": N, "groups": [N, ...], "name": "..."}|null}

Order in the job's child (``enter``): join the cgroups, unshare the mount namespace and make the
mounts, then drop privileges (setgroups, setgid, setuid) -- every step that needs root first.

With ``pid_ns`` the supervisor unshares a PID namespace before it forks, so that child is PID 1
of the job's namespace: it makes the sandbox as above (its mounts include a fresh ``/proc``, which
shows only the namespace's processes), then runs as the job's minimal init (``shim.py``), and the
job is its child. Nobody in the namespace sees or can signal a process outside it: not the agent,
not another job (even one running as the same user).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

V1_CONTROLLERS = ("memory", "cpu", "pids")
DEFAULT_PIDS_MAX = 32768
CPU_PERIOD_US = 100_000

_libc = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = (
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        )
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_c().unshare(flags), "unshare")


def setns(path: str, nstype: int = CLONE_NEWNS) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_c().setns(fd, nstype), f"setns {path}")
    finally:
        os.close(fd)


def own_pid_ns(pid: int) -> bool:
    """Whether process ``pid`` lives in another PID namespace than this process (a job with a
    namespace of its own: its sessions must join it). False when it cannot be told."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    except OSError:
        return False


def set_name(name: str) -> None:
    """This process's name as ``ps`` shows it (``comm``; prctl PR_SET_NAME, at most 15 bytes)."""
    _c().prctl(15, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def probe_pid_ns() -> int:
    """0 when this host lets us make a job's PID namespace and mount its /proc (in a fresh
    process: it unshares its own mount namespace), 1 when not. ``python sandbox.py --probe``
    runs it: the agent asks once, at start (``confine.py``)."""
    try:
        unshare(CLONE_NEWPID | CLONE_NEWNS)
        pid = os.fork()
    except OSError:
        return 1
    if pid == 0:
        try:
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            mount_proc()
            os._exit(0 if os.getpid() == 1 else 1)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return 0 if status == 0 else 1


def mount_proc() -> None:
    """A /proc of this process's PID namespace over the host's (in a private mount namespace)."""
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(
        _c().mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
        f"mount {source or fstype or ''} on {target}",
    )


# ---------------------------------------------------------------------------------------------
# cgroups


def cgroup_version(root: str = "/sys/fs/cgroup") -> tuple[str, str] | None:
    """(``"v2"``, its mount) when a unified hierarchy has the memory controller (the whole
    tree, or a hybrid host's ``unified``), (``"v1"``, root) when the v1 memory hierarchy is
    mounted, None when neither is usable."""
    for base in (root, os.path.join(root, "unified")):
        try:
            with open(os.path.join(base, "cgroup.controllers")) as f:
                if "memory" in f.read().split():
                    return "v2", base
        except OSError:
            pass
    if os.path.exists(os.path.join(root, "memory", "memory.limit_in_bytes")):
        return "v1", root
    return None


def cgroup_dirs(cg: dict) -> list[str]:
    """The job's cgroup directories: one per controller hierarchy (v1), one (v2)."""
    if cg["version"] == "v2":
        return [os.path.join(cg["root"], cg["name"])]
    return [os.path.join(cg["root"], c, cg["name"]) for c in V1_CONTROLLERS]


def _write(path: str, value: object) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _enable_v2_controllers(cg: dict) -> None:
    """Delegate memory, cpu and pids down to the job's cgroup (each parent's subtree_control)."""
    parts = cg["name"].split("/")[:-1]
    path = cg["root"]
    for part in ["", *parts]:
        if part:
            path = os.path.join(path, part)
            os.makedirs(path, exist_ok=True)
        try:
            with open(os.path.join(path, "cgroup.controllers")) as f:
                have = set(f.read().split())
        except OSError:
            have = {"memory", "cpu", "pids"}
        want = [c for c in ("memory", "cpu", "pids") if c in have]
        try:
            _write(os.path.join(path, "cgroup.subtree_control"), " ".join("+" + c for c in want))
        except OSError:
            pass  # already enabled, or a fake tree: the limits below say whether it took


def cgroup_create(cg: dict) -> None:
    """Make the job's cgroups and set its limits (by the supervisor, before the job starts)."""
    if cg["version"] == "v2":
        _enable_v2_controllers(cg)
        d = cgroup_dirs(cg)[0]
        os.makedirs(d, exist_ok=True)
        if cg.get("memory_bytes"):
            _write(os.path.join(d, "memory.max"), cg["memory_bytes"])
            try:  # no swapping around the limit
                _write(os.path.join(d, "memory.swap.max"), 0)
            except OSError:
                pass
        if cg.get("cpu_quota_us"):
            _write(
                os.path.join(d, "cpu.max"),
                f"{cg['cpu_quota_us']} {cg.get('cpu_period_us', CPU_PERIOD_US)}",
            )
        if cg.get("pids_max"):
            _write(os.path.join(d, "pids.max"), cg["pids_max"])
        return
    mem, cpu, pids = cgroup_dirs(cg)
    for d in (mem, cpu, pids):
        os.makedirs(d, exist_ok=True)
    if cg.get("memory_bytes"):
        _write(os.path.join(mem, "memory.limit_in_bytes"), cg["memory_bytes"])
        try:  # memory + swap at the same limit: no swapping around it
            _write(os.path.join(mem, "memory.memsw.limit_in_bytes"), cg["memory_bytes"])
        except OSError:
            pass
    if cg.get("cpu_quota_us"):
        _write(os.path.join(cpu, "cpu.cfs_period_us"), cg.get("cpu_period_us", CPU_PERIOD_US))
        _write(os.path.join(cpu, "cpu.cfs_quota_us"), cg["cpu_quota_us"])
    if cg.get("pids_max"):
        _write(os.path.join(pids, "pids.max"), cg["pids_max"])


def cgroup_join(cg: dict, pid: int = 0) -> None:
    """Move ``pid`` (0: this process, which must be single-threaded: a freshly forked child)
    into the job's cgroups.

    This process joins through v1's ``tasks`` with ``0``: moving the calling thread skips the
    kernel's global threadgroup lock, whose writer side waits for an RCU grace period (~0.1 ms
    instead of 1-8 ms per hierarchy on a busy host: it is on every job's start path)."""
    for d in cgroup_dirs(cg):
        if pid == 0 and cg["version"] == "v1":
            _write(os.path.join(d, "tasks"), 0)
        else:
            _write(os.path.join(d, "cgroup.procs"), pid or os.getpid())


def cgroup_pids(cg: dict) -> list[int]:
    pids: set[int] = set()
    for d in cgroup_dirs(cg):
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids.update(int(x) for x in f.read().split())
        except (OSError, ValueError):
            pass
    return sorted(pids)


def cgroup_kill(cg: dict) -> None:
    """SIGKILL whatever is left in the job's cgroups (also what left its process group)."""
    for pid in cgroup_pids(cg):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def oom_kills(cg: dict) -> int:
    """How many of the job's processes the kernel's OOM killer killed (v2 ``memory.events``,
    v1 ``memory.oom_control``: both count ``oom_kill``)."""
    d = cgroup_dirs(cg)[0]
    name = "memory.events" if cg["version"] == "v2" else "memory.oom_control"
    try:
        with open(os.path.join(d, name)) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_remove(cg: dict, timeout: float = 2.0) -> bool:
    """Kill what is left and remove the job's cgroups (after the job ended). False if one
    stayed (processes that would not die in ``timeout``)."""
    deadline = time.monotonic() + timeout
    left = cgroup_dirs(cg)
    while True:
        cgroup_kill(cg)
        still = []
        for d in left:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                still.append(d)
        left = still
        if not left or time.monotonic() > deadline:
            return not left
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# The job's child


def _mounts(sb: dict, proc: bool = False) -> None:
    unshare(CLONE_NEWNS)
    # Nothing mounted here propagates back to the host (and the host's later mounts stay out).
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    for src, dst in sb.get("binds") or ():
        if not os.path.exists(dst):
            if os.path.isdir(src):
                os.makedirs(dst, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(dst) or "/", exist_ok=True)
                os.close(os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644))
        mount(src, dst, None, MS_BIND | MS_REC)
    if sb.get("shm_bytes"):
        os.makedirs("/dev/shm", exist_ok=True)
        mount(
            "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={sb['shm_bytes']},mode=1777"
        )
    for dev in sb.get("hide") or ():
        if os.path.exists(dev):
            mount("/dev/null", dev, None, MS_BIND)
    if proc:  # PID 1 of the job's PID namespace: its /proc shows the job's processes alone
        mount_proc()


def drop_privileges(user: dict) -> None:
    os.setgroups(list(user.get("groups") or [user["gid"]]))
    os.setgid(user["gid"])
    os.setuid(user["uid"])


def enter(sb: dict, pid_ns: bool = False) -> None:
    """Put this process (the job's child, before exec; with ``pid_ns``, the init of the job's
    fresh PID namespace, which gets its own /proc) into its sandbox."""
    if sb.get("cgroup"):
        cgroup_join(sb["cgroup"])
    if sb.get("mount_ns"):
        _mounts(sb, proc=pid_ns)
    if sb.get("user"):
        drop_privileges(sb["user"])


def enter_job(sb: dict, job_pid: int, pid_ns: bool = False) -> None:
    """Put this process (an SSH session's child, before exec) into the sandbox of the running
    job whose first process is ``job_pid``: its cgroups, its PID namespace (``pid_ns``: only
    this process's children enter it -- the caller runs its command through a fork, see
    ``devenv/session.py``), its mount namespace, its user."""
    # Both namespaces opened through the host's /proc first: once in the job's mount namespace,
    # /proc is the job's own, where ``job_pid`` (a host pid) means nothing.
    fds = []
    try:
        if pid_ns:
            fds.append(
                (os.open(f"/proc/{job_pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC), CLONE_NEWPID)
            )
        if sb.get("mount_ns"):
            fds.append(
                (os.open(f"/proc/{job_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC), CLONE_NEWNS)
            )
        if sb.get("cgroup"):
            cgroup_join(sb["cgroup"])
        for fd, kind in fds:
            _check(_c().setns(fd, kind), f"setns into the job's namespace ({kind:#x})")
    finally:
        for fd, _ in fds:
            os.close(fd)
    if sb.get("user"):
        drop_privileges(sb["user"])


if __name__ == "__main__" and sys.argv[1:] == ["--probe"]:
    sys.exit(probe_pid_ns())
