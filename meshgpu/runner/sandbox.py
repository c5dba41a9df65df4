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
     "binds": [["/host/src", "/job/dst"], ...],  # instance volumes (bind mounts)
     "shm_bytes": N|null,                        # tmpfs at /dev/shm of that size
     "hide": ["/dev/nvidia1", ...],              # /dev/null bound over them
     "user": {"uid": N, "gid": N, "groups": [N, ...], "name": "..."}|null}

Order in the job's child (``enter``): join the cgroups, unshare the mount namespace and make the
mounts, then drop privileges (setgroups, setgid, setuid) -- every step that needs root first.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
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


def _mounts(sb: dict) -> None:
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


def drop_privileges(user: dict) -> None:
    os.setgroups(list(user.get("groups") or [user["gid"]]))
    os.setgid(user["gid"])
    os.setuid(user["uid"])


def enter(sb: dict) -> None:
    """Put this process (the job's child, before exec) into its sandbox."""
    if sb.get("cgroup"):
        cgroup_join(sb["cgroup"])
    if sb.get("mount_ns"):
        _mounts(sb)
    if sb.get("user"):
        drop_privileges(sb["user"])


def enter_job(sb: dict, job_pid: int) -> None:
    """Put this process (an SSH session's child, before exec) into the sandbox of the running
    job whose first process is ``job_pid``: its cgroups, its mount namespace, its user."""
    if sb.get("cgroup"):
        cgroup_join(sb["cgroup"])
    if sb.get("mount_ns"):
        setns(f"/proc/{job_pid}/ns/mnt")
    if sb.get("user"):
        drop_privileges(sb["user"])
