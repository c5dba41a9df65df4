"""``meshgpu offer``: where a request would fit now."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from meshgpu.cli._common import JsonOpt, UrlOpt, client, fail, out, table


def offer(
    file: Annotated[
        Path | None,
        typer.Option("-f", "--file", help="Answer for this run configuration (filters, groups)"),
    ] = None,
    gpu: Annotated[
        str | None, typer.Option("--gpu", help="e.g. H100:80GB:2, A100,H100:1..4, 24GB..:2")
    ] = None,
    cpu: Annotated[str | None, typer.Option("--cpu", help="e.g. 8.., arm:16")] = None,
    memory: Annotated[str | None, typer.Option("--memory", help="e.g. 64GB..")] = None,
    disk: Annotated[str | None, typer.Option("--disk", help="e.g. 200GB..")] = None,
    nodes: Annotated[
        int | None, typer.Option("--nodes", min=1, help="Jobs of a multi-node run")
    ] = None,
    fleet: Annotated[
        list[str] | None, typer.Option("--fleet", help="Only hosts of this fleet (repeatable)")
    ] = None,
    after_queue: Annotated[
        bool,
        typer.Option("--after-queue", help="Let the waiting queue take its share first"),
    ] = False,
    backends: Annotated[
        bool,
        typer.Option(
            "--backends/--no-backends",
            help="Also list what the configured backends would sell for it (prices)",
        ),
    ] = True,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
) -> None:
    """Where a request would fit now: idle hosts first, in the order the scheduler picks them."""
    if file is not None:
        if fleet:
            raise fail("--fleet goes with a request on the command line; with -f write fleets:")
        from meshgpu.cli._runs import _load

        _, text = _load(file)
        with client(url) as c:
            doc = c.offers_for(
                text,
                str(file),
                gpu=gpu,
                cpu=cpu,
                memory=memory,
                disk=disk,
                nodes=nodes,
                after_queue=after_queue or None,
                backends=backends,
            )
    else:
        with client(url) as c:
            doc = c.offers(
                gpu=gpu,
                cpu=cpu,
                memory=memory,
                disk=disk,
                nodes=nodes,
                fleet=fleet or None,
                after_queue=after_queue or None,
                backends=backends,
            )
    if as_json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    for n, req in enumerate(doc["requests"]):
        if n:
            out.print()
        _show_request(req)


def _show_request(req: dict[str, Any]) -> None:
    title = req["summary"]
    if req["group"] is not None:
        title = f"group {req['group']}: {title}"
    if req["nodes"] > 1:
        title += f", {req['jobs']} of a {req['nodes']}-node gang, one host each"
    elif req["jobs"] > 1:
        title += f", {req['jobs']} jobs"
    out.print(title, markup=False)
    rows = []
    for i, o in enumerate(req["offers"], 1):
        if o["availability"] == "idle":
            gets = "gpu " + ",".join(map(str, o["gpu_indices"])) if o["gpu_indices"] else "no GPU"
            if o["blocks"] is not None:
                gets += f" ({o['blocks']}/{o['total_blocks']} blocks)"
        else:
            gets = "-"
        blocks = (
            f"{o['free_blocks']}/{o['total_blocks']} free" if o["total_blocks"] is not None else "-"
        )
        avail = o["availability"]
        if o["reserved_for"]:
            avail += f" (held for {o['reserved_for']})"
        labels = ",".join(f"{k}={v}" for k, v in o["labels"].items())
        rows.append(
            [
                i,
                o["node"],
                o["gpus"],
                f"{o['free_gpus']}/{o['total_gpus']} free",
                blocks,
                gets,
                avail,
                labels or "-",
            ]
        )
    if rows:
        table(["#", "NODE", "GPUS", "FREE", "BLOCKS", "WOULD GET", "AVAILABILITY", "LABELS"], rows)
    if req["fits_now"]:
        hosts = "host" if req["idle"] == 1 else "hosts"
        out.print(f"fits now: {req['idle']} idle {hosts}", markup=False)
    else:
        out.print(req["reason"], markup=False)
    _show_backend_offers(req)


def _show_backend_offers(req: dict[str, Any]) -> None:
    """What the backends would sell for it (a backend fleet buys the cheapest that fits)."""
    offers, errors = req.get("backend_offers"), req.get("backend_errors") or []
    if offers is None:
        return
    rows = []
    for i, o in enumerate(offers, 1):
        gpus = f"{o['gpu_count']}x{o['gpu_name']}" if o["gpu_count"] else "-"
        if o["gpu_count"] and o["gpu_memory_gb"]:
            gpus += f":{o['gpu_memory_gb']:g}GB"
        rows.append(
            [
                i,
                o["backend"],
                o["region"] + (f"/{o['zone']}" if o.get("zone") else ""),
                o["instance_type"],
                gpus,
                o["cpus"],
                f"{o['memory_gb']:g}GB",
                "spot" if o["spot"] else "on-demand",
                f"${o['price']:g}",
                o["availability"],
            ]
        )
    if rows:
        out.print("backend offers (bought by a backend fleet that may grow):", markup=False)
        table(
            [
                "#",
                "BACKEND",
                "REGION",
                "INSTANCE TYPE",
                "GPUS",
                "CPUS",
                "MEMORY",
                "SPOT",
                "PRICE/H",
                "AVAILABILITY",
            ],
            rows,
        )
    else:
        out.print("no backend offer meets it", markup=False)
    for e in errors:
        out.print(f"backend error: {e}", markup=False)
