"""Metrics history: each host keeps, in memory, a bounded record of its GPUs' and its jobs' use,
which ``meshgpu metrics RUN --since 1h`` and the dashboard's charts read (through any node: the
node asked reads its own and asks each job's host over the peer port, as ``meshgpu metrics``).

Two tiers per series: the last ``FINE_S`` (24 h) at the sampling interval (10 s), and beyond
that, up to ``COARSE_S`` (7 days), averages over ``COARSE_STEP_S`` (5 minutes); a sample that
falls off the fine tier is folded into the coarse one. Columns are ``array('d')`` rings (NaN for a
value the driver does not report), so a series costs at most 8 bytes per value: a GPU's 24 h is
~350 KB, a job's ~200 KB. Job series are kept for at most ``MAX_JOBS`` jobs (the longest quiet
ones go first) and for ``COARSE_S`` after their last sample.

A reader asks for a window (``since_s`` back from now) and at most ``points`` points: when the
window holds more, consecutive samples are averaged into ``points`` equal time buckets, so an
answer is bounded whatever the window (the peer protocol's frames and the browser both are).
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Iterator, Sequence
from typing import Any

INTERVAL_S = 10.0
FINE_S = 24 * 3600.0
COARSE_STEP_S = 300.0
COARSE_S = 7 * 24 * 3600.0
MAX_JOBS = 128
MAX_POINTS = 2000
DEFAULT_POINTS = 500

GPU_COLUMNS = ("utilization_pct", "memory_used_mib", "temperature_c", "power_w")
JOB_COLUMNS = ("cpu_pct", "memory_bytes", "processes")
NAN = float("nan")


def _num(v: Any) -> float:
    return NAN if v is None else float(v)


class Ring:
    """A fixed-capacity ring of rows ``(t, *values)``, one ``array('d')`` per column."""

    def __init__(self, columns: int, capacity: int) -> None:
        self.capacity = capacity
        self.cols = [array("d") for _ in range(columns + 1)]
        self.head = 0  # the oldest row's position once full

    def __len__(self) -> int:
        return len(self.cols[0])

    def append(self, row: Sequence[float]) -> tuple[float, ...] | None:
        """Add ``row``; the row it pushed out when full (else None)."""
        if len(self) < self.capacity:
            for col, v in zip(self.cols, row, strict=True):
                col.append(v)
            return None
        old = tuple(col[self.head] for col in self.cols)
        for col, v in zip(self.cols, row, strict=True):
            col[self.head] = v
        self.head = (self.head + 1) % self.capacity
        return old

    def rows(self, since: float = -math.inf) -> Iterator[tuple[float, ...]]:
        """Rows with ``t >= since``, oldest first."""
        n = len(self)
        for k in range(n):
            i = (self.head + k) % n if n == self.capacity else k
            if self.cols[0][i] >= since:
                yield tuple(col[i] for col in self.cols)

    @property
    def last_t(self) -> float:
        n = len(self)
        if not n:
            return -math.inf
        return self.cols[0][(self.head - 1) % n if n == self.capacity else n - 1]


def _mean_rows(rows: list[tuple[float, ...]]) -> tuple[float, ...]:
    """The average row (time: the first row's bucket time given by the caller; NaN ignored)."""
    out = []
    for c in range(len(rows[0])):
        vals = [r[c] for r in rows if not math.isnan(r[c])]
        out.append(sum(vals) / len(vals) if vals else NAN)
    return tuple(out)


class Series:
    """One GPU's or one job's samples: a fine ring and a coarse ring of 5-minute averages."""

    def __init__(
        self,
        columns: int,
        interval_s: float = INTERVAL_S,
        fine_s: float = FINE_S,
        coarse_step_s: float = COARSE_STEP_S,
        coarse_s: float = COARSE_S,
    ) -> None:
        self.fine = Ring(columns, max(1, int(fine_s / interval_s)))
        self.coarse = Ring(columns, max(1, int(coarse_s / coarse_step_s)))
        self.step = coarse_step_s
        self._bucket: list[tuple[float, ...]] = []  # fine rows pushed out, not yet averaged

    def add(self, t: float, values: Sequence[float]) -> None:
        old = self.fine.append((t, *values))
        if old is None:
            return
        if self._bucket and old[0] // self.step != self._bucket[0][0] // self.step:
            self._flush()
        self._bucket.append(old)

    def _flush(self) -> None:
        start = self._bucket[0][0] // self.step * self.step
        self.coarse.append((start, *_mean_rows(self._bucket)[1:]))
        self._bucket.clear()

    @property
    def last_t(self) -> float:
        return self.fine.last_t

    def window(self, since: float, until: float = math.inf) -> list[tuple[float, ...]]:
        """Every row in ``[since, until]``, coarse rows before the fine ones."""
        first_fine = next(iter(self.fine.rows()), (math.inf,))[0]
        out = [r for r in self.coarse.rows(since) if r[0] < first_fine]
        if self._bucket and self._bucket[0][0] >= since:
            out.append((self._bucket[0][0] // self.step * self.step, *_mean_rows(self._bucket)[1:]))
        out += self.fine.rows(since)
        return [r for r in out if r[0] <= until]


def downsample(rows: list[tuple[float, ...]], since: float, until: float, points: int) -> list:
    """At most ``points`` rows: rows averaged into equal time buckets over ``[since, until]``."""
    if len(rows) <= points:
        return rows
    width = max((until - since) / points, 1e-9)
    buckets: dict[int, list[tuple[float, ...]]] = {}
    for r in rows:
        buckets.setdefault(min(points - 1, int((r[0] - since) // width)), []).append(r)
    return [_mean_rows(b) for _, b in sorted(buckets.items())]


def columns(rows: list[tuple[float, ...]], names: Sequence[str]) -> dict[str, list[Any]]:
    """Rows as JSON columns: ``t`` (rounded to ms) and one list per name (NaN as null)."""
    out: dict[str, list[Any]] = {"t": [round(r[0], 3) for r in rows]}
    for c, name in enumerate(names, start=1):
        out[name] = [None if math.isnan(r[c]) else round(r[c], 3) for r in rows]
    return out


class MetricsHistory:
    """This host's series: one per GPU, one per job (job id). Fed by one sampler task; read by
    the API. Not thread-safe: both run on the event loop (the sample itself is taken in a
    worker thread, then handed to ``record``)."""

    def __init__(self, interval_s: float = INTERVAL_S, max_jobs: int = MAX_JOBS) -> None:
        self.interval_s = interval_s
        self.max_jobs = max_jobs
        self.gpus: dict[int, Series] = {}
        self.jobs: dict[str, Series] = {}
        self._cpu: dict[str, tuple[float, float]] = {}  # job id -> (monotonic t, cpu seconds)

    def _series(self, columns: int) -> Series:
        return Series(columns, self.interval_s)

    def record(
        self,
        t: float,
        mono: float,
        telemetry: Sequence[dict[str, Any]],
        usage: dict[str, Any],
    ) -> None:
        """One sample: ``telemetry`` (``GPUTelemetry`` as dicts), ``usage`` job id ->
        ``GroupUsage`` of the jobs running here; CPU percent from the previous sample."""
        for g in telemetry:
            s = self.gpus.get(g["index"])
            if s is None:
                s = self.gpus[g["index"]] = self._series(len(GPU_COLUMNS))
            s.add(t, [_num(g.get(c)) for c in GPU_COLUMNS])
        for job_id, u in usage.items():
            prev = self._cpu.get(job_id)
            cpu_pct = NAN
            if prev is not None and mono > prev[0]:
                cpu_pct = max(0.0, 100.0 * (u.cpu_seconds - prev[1]) / (mono - prev[0]))
            self._cpu[job_id] = (mono, u.cpu_seconds)
            s = self.jobs.get(job_id)
            if s is None:
                s = self.jobs[job_id] = self._series(len(JOB_COLUMNS))
            s.add(t, [cpu_pct, float(u.memory_bytes), float(u.processes)])
        self._forget(t)

    def _forget(self, now: float) -> None:
        for job_id in [j for j, s in self.jobs.items() if s.last_t < now - COARSE_S]:
            del self.jobs[job_id]
            self._cpu.pop(job_id, None)
        while len(self.jobs) > self.max_jobs:
            oldest = min(self.jobs, key=lambda j: self.jobs[j].last_t)
            del self.jobs[oldest]
            self._cpu.pop(oldest, None)

    def job(
        self, job_id: str, gpu_indices: Sequence[int], since: float, until: float, points: int
    ) -> dict[str, Any]:
        """A job's series and its GPUs' over the job's own samples in ``[since, until]``."""
        s = self.jobs.get(job_id)
        rows = s.window(since, until) if s is not None else []
        out: dict[str, Any] = columns(downsample(rows, since, until, points), JOB_COLUMNS)
        # The GPUs over the same span as the job's samples (before it started they were
        # someone else's).
        start = rows[0][0] if rows else until
        end = rows[-1][0] if rows else until
        out["gpus"] = []
        for i in gpu_indices:
            g = self.gpus.get(i)
            grows = g.window(start, end) if g is not None else []
            out["gpus"].append(
                {"index": i} | columns(downsample(grows, start, end, points), GPU_COLUMNS)
            )
        return out


def now() -> tuple[float, float]:
    return time.time(), time.monotonic()


__all__ = [
    "DEFAULT_POINTS",
    "GPU_COLUMNS",
    "INTERVAL_S",
    "JOB_COLUMNS",
    "MAX_POINTS",
    "MetricsHistory",
    "Ring",
    "Series",
    "downsample",
]
