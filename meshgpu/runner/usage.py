"""What a job's processes use now: CPU time and resident memory of its process group.

The shim starts every job as the leader of a new process group (``job.pid`` records it), so one
pass over ``/proc`` finds every process of every job, however deep its children go. CPU time
counts what live processes used plus what their reaped children used (``cutime``/``cstime``), so
it only grows while the job runs; a percentage needs two samples (``cpu_percent``). Memory is the
sum of resident sets (shared pages count once per process, as ``ps`` shows them).

A container job's processes live in the container runtime's process tree, not in the group: for
those only the runtime client shows here (GPU telemetry still covers the job's GPUs).
Blocking (reads ``/proc``): call from a worker thread. Off Linux every sample is empty.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class GroupUsage:
    """One sample of one process group."""

    cpu_seconds: float
    memory_bytes: int
    processes: int


def job_pgid(job_dir: Path) -> int | None:
    """The process group the shim started the job in (None before it started or once gone)."""
    try:
        return int(json.loads((job_dir / "job.pid").read_text())["pgid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sample_groups(pgids: Iterable[int], proc: Path = _PROC) -> dict[int, GroupUsage]:
    """One pass over ``/proc``: the usage of each of ``pgids`` that has a live process."""
    wanted = set(pgids)
    if not wanted:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    totals: dict[int, list[float]] = {}
    try:
        entries = list(proc.iterdir())
    except OSError:
        return {}
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited between the listing and the read
        # ``comm`` (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        pgrp = int(fields[2])
        if pgrp not in wanted or fields[0] in ("Z", "X"):
            continue
        cpu = sum(int(fields[i]) for i in (11, 12, 13, 14)) / tick
        acc = totals.setdefault(pgrp, [0.0, 0, 0])
        acc[0] += cpu
        acc[1] += int(fields[21]) * page
        acc[2] += 1
    return {
        g: GroupUsage(cpu_seconds=round(c, 2), memory_bytes=int(m), processes=int(n))
        for g, (c, m, n) in totals.items()
    }


def cpu_percent(
    before: GroupUsage | None, after: GroupUsage | None, seconds: float
) -> float | None:
    """CPU use between two samples, in percent of one CPU (200 = two CPUs busy)."""
    if before is None or after is None or seconds <= 0:
        return None
    return round(max(0.0, after.cpu_seconds - before.cpu_seconds) / seconds * 100, 1)


__all__ = ["GroupUsage", "cpu_percent", "job_pgid", "sample_groups"]
