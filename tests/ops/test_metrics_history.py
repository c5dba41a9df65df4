"""The metrics history ring (meshgpu/ops/history.py): bounded tiers, downsampling on read, the
per-job and per-GPU series a host keeps."""

from __future__ import annotations

import math
import types

from meshgpu.ops.history import (
    GPU_COLUMNS,
    MetricsHistory,
    Ring,
    Series,
    columns,
    downsample,
)


def test_ring_keeps_the_newest_rows_in_order() -> None:
    r = Ring(1, 3)
    assert [r.append((t, t * 10)) for t in range(3)] == [None, None, None]
    assert r.append((3, 30)) == (0, 0)  # the oldest row goes
    assert [row[0] for row in r.rows()] == [1, 2, 3] and r.last_t == 3
    assert [row[0] for row in r.rows(since=2)] == [2, 3]
    assert len(r) == 3


def test_series_folds_what_falls_off_the_fine_tier_into_averages() -> None:
    # 10 s samples, 60 s of fine history, 30 s coarse buckets, 300 s of coarse history.
    s = Series(1, interval_s=10, fine_s=60, coarse_step_s=30, coarse_s=300)
    for k in range(100):
        s.add(k * 10.0, [float(k)])
    assert len(s.fine) == 6  # bounded
    assert len(s.coarse) <= 10
    rows = s.window(0)
    fine_t = [r[0] for r in rows[-6:]]
    assert fine_t == [940.0, 950.0, 960.0, 970.0, 980.0, 990.0]
    coarse = rows[:-6]
    assert all(r[0] % 30 == 0 for r in coarse)  # bucket starts
    assert [r[0] for r in coarse] == sorted(r[0] for r in coarse)
    # A bucket of samples 10 s apart starting at 900: values 90, 91, 92 -> 91.
    assert dict((r[0], r[1]) for r in coarse)[900.0] == 91.0
    assert rows[0][0] >= 990 - 60 - 300  # nothing older than the two tiers hold


def test_downsample_bounds_an_answer_and_keeps_nan_out_of_means() -> None:
    rows = [(float(t), float(t % 2) if t % 3 else math.nan) for t in range(1000)]
    out = downsample(rows, 0, 1000, 50)
    assert len(out) == 50
    assert all(0 <= r[1] <= 1 for r in out)
    assert downsample(rows[:10], 0, 10, 50) == rows[:10]
    doc = columns([(1.0, math.nan, 2.5)], ["a", "b"])
    assert doc == {"t": [1.0], "a": [None], "b": [2.5]}


def test_history_keeps_jobs_and_gpus_and_computes_cpu_percent() -> None:
    h = MetricsHistory(interval_s=1, max_jobs=2)
    for k in range(5):
        tele = [{"index": i, "utilization_pct": 50.0 + i, "memory_used_mib": 100} for i in (0, 1)]
        usage = {
            "j1": types.SimpleNamespace(cpu_seconds=k * 0.5, memory_bytes=1 << 20, processes=2)
        }
        h.record(1000.0 + k, 10.0 + k, tele, usage)
    doc = h.job("j1", [1], 0, 2000, 100)
    assert doc["t"] == [1000.0, 1001.0, 1002.0, 1003.0, 1004.0]
    assert doc["cpu_pct"] == [None, 50.0, 50.0, 50.0, 50.0]  # half a CPU
    assert doc["memory_bytes"] == [1 << 20] * 5 and doc["processes"] == [2] * 5
    [gpu] = doc["gpus"]
    assert gpu["index"] == 1 and gpu["utilization_pct"] == [51.0] * 5
    assert set(gpu) == {"index", "t", *GPU_COLUMNS} and gpu["temperature_c"] == [None] * 5
    assert h.job("nope", [0], 0, 2000, 100)["t"] == []
    # Bounded in jobs: the one quiet longest goes.
    for k, job in enumerate(("j2", "j3")):
        u = types.SimpleNamespace(cpu_seconds=0.0, memory_bytes=0, processes=1)
        h.record(1100.0 + k, 200.0 + k, [], {job: u})
    assert set(h.jobs) == {"j2", "j3"}
