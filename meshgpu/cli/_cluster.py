"""``meshgpu nodes|status``."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from meshgpu.cli._common import JsonOpt, UrlOpt, client, out, positive_duration, table


def nodes(
    as_json: JsonOpt = False,
    unhealthy: Annotated[
        bool,
        typer.Option(
            "--unhealthy", help="Only hosts with a GPU marked unhealthy, and only those GPUs"
        ),
    ] = False,
    url: UrlOpt = None,
) -> None:
    """Members, roles, GPUs, health and labels."""
    with client(url) as c:
        ns = c.nodes()
    if unhealthy:
        ns = [
            n | {"gpus": [g for g in n["gpus"] if not g["healthy"]]}
            for n in ns
            if any(not g["healthy"] for g in n["gpus"])
        ]
        if not ns and not as_json:
            out.print("every GPU is healthy")
            return
    if not as_json:  # the API pages newest first; a table reads best by name
        ns.sort(key=lambda n: n["name"])
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
        blocks = n.get("blocks")
        gossip = n.get("gossip") or {}
        rows.append(
            [
                n["name"],
                n["role"],
                n["status"],
                gossip.get("state", "-"),
                f"{n['cpu_count']} {n['cpu_arch']}",
                f"{n['memory_gb']}GB",
                summary,
                f"{n['busy_blocks']}/{blocks} busy" if blocks is not None else "-",
                labels or "-",
            ]
        )
    table(["NAME", "ROLE", "STATUS", "GOSSIP", "CPU", "MEMORY", "GPUS", "BLOCKS", "LABELS"], rows)
    if ns and any(n["gpus"] for n in ns):
        for n in ns:
            for g in n["gpus"]:
                fault = "" if g["healthy"] else f" UNHEALTHY: {g.get('health_reason') or '?'}"
                out.print(
                    f"  {n['name']} gpu{g['index']}: {g['name']} {g['memory_mib'] // 1024}GB "
                    f"{g['uuid']}{fault}"
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


token_app = typer.Typer(help="Join tokens for new hosts.", no_args_is_help=True)


@token_app.command("create")
def token_create(
    ttl: Annotated[
        str, typer.Option("--ttl", help="Expire after e.g. 1h, 7d; 'never' for no expiry")
    ] = "24h",
    reusable: Annotated[
        bool,
        typer.Option("--reusable", help="Many hosts may join with it (default: single-use)"),
    ] = False,
    url: UrlOpt = None,
) -> None:
    """A join token: on the new host, meshgpu agent --token TOKEN [--join MEMBER]. Single-use
    unless --reusable; expires after --ttl (a day by default)."""
    never = ttl.strip().lower() == "never"
    ttl_s = 0 if never else positive_duration("--ttl", ttl, "1h or 7d, or never")
    params = {"ttl_s": ttl_s, "reusable": str(reusable).lower()}
    with client(url) as c:
        doc = c._request("POST", "/api/v1/tokens", params=params).json()  # noqa: SLF001
    print(doc["token"])


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (4th field)")], url: UrlOpt = None
) -> None:
    """Revoke a join token: hosts can no longer join with it."""
    with client(url) as c:
        c._request("DELETE", f"/api/v1/tokens/{token_id}")  # noqa: SLF001
    out.print(f"revoked {token_id}")
