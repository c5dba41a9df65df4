"""``meshgpu nodes|status``."""

from __future__ import annotations

import json
import sys

from meshgpu.cli._common import JsonOpt, UrlOpt, client, out, table


def nodes(as_json: JsonOpt = False, url: UrlOpt = None) -> None:
    """Members, roles, GPUs, health and labels."""
    with client(url) as c:
        ns = c.nodes()
    if as_json:
        json.dump(ns, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    rows = []
    for n in ns:
        gpus = n["gpus"]
        summary = "-"
        if gpus:
            busy = sum(g["busy"] for g in gpus)
            unhealthy = sum(not g["healthy"] for g in gpus)
            summary = (
                f"{len(gpus)}x{gpus[0]['name']}:{gpus[0]['memory_mib'] // 1024}GB ({busy} busy"
            )
            summary += f", {unhealthy} unhealthy)" if unhealthy else ")"
        labels = ",".join(f"{k}={v}" for k, v in n["labels"].items())
        rows.append(
            [
                n["name"],
                n["role"],
                n["status"],
                f"{n['cpu_count']} {n['cpu_arch']}",
                f"{n['memory_gb']}GB",
                summary,
                labels or "-",
            ]
        )
    table(["NAME", "ROLE", "STATUS", "CPU", "MEMORY", "GPUS", "LABELS"], rows)
    if ns and any(n["gpus"] for n in ns):
        for n in ns:
            for g in n["gpus"]:
                out.print(
                    f"  {n['name']} gpu{g['index']}: {g['name']} {g['memory_mib'] // 1024}GB {g['uuid']}"
                )


def status(as_json: JsonOpt = False, url: UrlOpt = None) -> None:
    """Cluster id, leader, term, commit index, voters."""
    with client(url) as c:
        st = c.status()
    if as_json:
        json.dump(st, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    table(["", ""], [[k, v] for k, v in st.items()])
