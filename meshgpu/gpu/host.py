"""CPU, memory and disk of this host (Linux; portable fallbacks elsewhere)."""

from __future__ import annotations

import os
import platform
import shutil
import socket
from pathlib import Path

from meshgpu.gpu._types import HostInfo


def _memory_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024))


def host_info(data_dir: str | Path = "/") -> HostInfo:
    """What this host offers; disk is measured where job data lives (``data_dir``)."""
    path = Path(data_dir)
    while not path.exists() and path != path.parent:
        path = path.parent
    disk = shutil.disk_usage(path)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    machine = platform.machine().lower()
    return HostInfo(
        hostname=socket.gethostname(),
        cpu_count=cpus,
        cpu_arch="arm" if machine in ("arm64", "aarch64") or machine.startswith("arm") else "x86",
        memory_mib=_memory_mib(),
        disk_total_gb=round(disk.total / 1024**3, 1),
        disk_free_gb=round(disk.free / 1024**3, 1),
    )
