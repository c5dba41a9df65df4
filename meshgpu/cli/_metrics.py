"""``meshgpu metrics``: what a run's jobs use, sampled on the hosts that run them."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer

from meshgpu.cli._common import JsonOpt, UrlOpt, client, fail, out, positive_duration, table

SPARK = "▁▂▃▄▅▆▇█"
SPARK_POINTS = 60
MAX_SINCE_S = 7 * 86400


def spark(values: list[float | None], top: float | None = None) -> str:
    """A one-line chart of ``values`` (None: a gap), scaled to ``top`` (default: the max)."""
    real = [v for v in values if v is not None]
    if not real:
        return ""
    top = top or max(real) or 1.0
    return "".join(
        " " if v is None else SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))]
        for v in values
    )


def _stats(values: list[float | None], fmt: Any) -> str:
    real = [v for v in values if v is not None]
    if not real:
        return "-"
    return f"avg {fmt(sum(real) / len(real))} max {fmt(max(real))}"


def _history(run: str, job: int | None, since: str, as_json: bool, url: str | None) -> None:
    since_s = positive_duration("--since", since, "1h, 30m or 2d")
    if since_s > MAX_SINCE_S:
        raise fail(f"--since goes back at most 7d (history is kept a week), not {since}")
    with client(url) as c:
        doc = c.run_history(run, since_s, job, None if as_json else SPARK_POINTS)
    if as_json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    for j in doc["jobs"]:
        head = f"job {j['job_num']} on {j['node'] or '-'} ({j['status']})"
        t = j.get("t") or []
        if j.get("error") or not t:
            out.print(f"{head}: {j.get('error') or 'no samples in this window'}")
            continue
        span = (
            time.strftime("%H:%M:%S", time.localtime(t[0]))
            + " .. "
            + time.strftime("%H:%M:%S", time.localtime(t[-1]))
        )
        out.print(f"{head}: {len(t)} points {span}")
        rows = [
            ["cpu", _stats(j["cpu_pct"], lambda v: f"{v:.0f}%"), spark(j["cpu_pct"])],
            [
                "memory",
                _stats(j["memory_bytes"], lambda v: _size(int(v))),
                spark(j["memory_bytes"]),
            ],
        ]
        for g in j["gpus"]:
            u = g["utilization_pct"]
            rows.append([f"gpu{g['index']}", _stats(u, lambda v: f"{v:.0f}%"), spark(u, 100.0)])
            m = g["memory_used_mib"]
            rows.append(
                [f"gpu{g['index']} mem", _stats(m, lambda v: f"{v / 1024:.1f}GB"), spark(m)]
            )
        table(["SERIES", "VALUES", "HISTORY"], rows)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f}GB"
    return f"{n / (1 << 20):.0f}MB"


def _gpu_cell(g: dict[str, Any]) -> str:
    util = g.get("utilization_pct")
    used = g.get("memory_used_mib")
    total = g.get("memory_mib")
    parts = [f"gpu{g['index']}"]
    parts.append(f"{util:.0f}%" if util is not None else "-%")
    if used is not None and total:
        parts.append(f"{used / 1024:.1f}/{total / 1024:.0f}GB")
    if g.get("healthy") is False:
        parts.append("UNHEALTHY")
    return " ".join(parts)


def metrics(
    run: Annotated[str, typer.Argument(help="Run name")],
    job: Annotated[int | None, typer.Option("--job", help="Only this job number")] = None,
    watch: Annotated[bool, typer.Option("-w", "--watch", help="Refresh every 2 s")] = False,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="History instead of a sample: the last 1h, 30m, 2d.. (kept by each job's host: "
            "10 s apart for 24 h, 5-minute averages for 7 days)",
        ),
    ] = None,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
) -> None:
    """CPU, memory, and per-GPU utilization and memory of a run's jobs, from their hosts;
    with --since, their history."""
    if since is not None:
        if watch:
            raise fail("--since and --watch do not go together: pick one")
        _history(run, job, since, as_json, url)
        return
    with client(url) as c:
        while True:
            doc = c.run_metrics(run, job)
            if as_json:
                json.dump(doc, sys.stdout, indent=2)
                sys.stdout.write("\n")
                return
            rows = []
            for j in doc["jobs"]:
                cpu = f"{j['cpu_pct']:.0f}%" if j["cpu_pct"] is not None else "-"
                gpus = [_gpu_cell(g) for g in j["gpus"]] or ["-"]
                rows.append(
                    [
                        j["job_num"],
                        j["node"] or "-",
                        j["status"],
                        cpu,
                        _size(j["memory_bytes"]),
                        gpus[0],
                        j["error"] or "",
                    ]
                )
                rows.extend(["", "", "", "", "", g, ""] for g in gpus[1:])
            table(["JOB", "NODE", "STATUS", "CPU", "MEMORY", "GPU", "NOTE"], rows)
            if not watch:
                return
            try:
                time.sleep(2)
            except KeyboardInterrupt:
                raise typer.Exit(130) from None
            if out.is_terminal:
                out.clear()
