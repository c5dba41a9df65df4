"""``meshgpu metrics``: what a run's jobs use, sampled on the hosts that run them."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer

from meshgpu.cli._common import JsonOpt, UrlOpt, client, out, table


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
    as_json: JsonOpt = False,
    url: UrlOpt = None,
) -> None:
    """CPU, memory, and per-GPU utilization and memory of a run's jobs, from their hosts."""
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
