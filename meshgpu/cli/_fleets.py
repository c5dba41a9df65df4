"""``meshgpu apply -f fleet.yml`` (an SSH fleet) and ``meshgpu fleet ls|get|delete``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from meshgpu.cli._common import JsonOpt, UrlOpt, ago, client, err, fail, out, table
from meshgpu.config import ConfigError
from meshgpu.config.errors import ConfigIssue

app = typer.Typer(help="SSH fleets: hosts the mesh installs its agent on.", no_args_is_help=True)


def read_identities(config: Any, text: str, file: Path) -> dict[str, str]:
    """The private key of every ``identity_file`` the fleet names, read here (where the CLI
    runs, as dstack reads them), or every unreadable one as a located ConfigError."""
    from meshgpu.config.loader import parse_config_located

    _, pos = parse_config_located(text, str(file))
    refs: list[tuple[tuple[str | int, ...], str]] = []
    ssh = config.ssh_config
    if ssh.identity_file:
        refs.append((("ssh_config", "identity_file"), ssh.identity_file))
    if ssh.proxy_jump and ssh.proxy_jump.identity_file:
        refs.append((("ssh_config", "proxy_jump", "identity_file"), ssh.proxy_jump.identity_file))
    for i, h in enumerate(ssh.hosts):
        if h.identity_file:
            refs.append((("ssh_config", "hosts", i, "identity_file"), h.identity_file))
        if h.proxy_jump and h.proxy_jump.identity_file:
            refs.append(
                (
                    ("ssh_config", "hosts", i, "proxy_jump", "identity_file"),
                    h.proxy_jump.identity_file,
                )
            )
    keys: dict[str, str] = {}
    issues = []
    for path, name in refs:
        p = Path(name).expanduser()
        if not p.is_absolute():
            p = file.parent / p
        try:
            keys[name] = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            line, col = pos.get(path, (None, None))
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            issues.append(
                ConfigIssue(
                    str(file),
                    line,
                    col,
                    ".".join(str(x) if isinstance(x, str) else f"[{x}]" for x in path).replace(
                        ".[", "["
                    ),
                    f"cannot read the private key {p}: {why}",
                )
            )
    if issues:
        raise ConfigError(issues)
    return keys


def apply_fleet(config: Any, text: str, file: Path, url: str | None, wait: bool) -> None:
    if config.ssh_config is None:
        raise fail(
            f"{file}: only SSH fleets (ssh_config with hosts) are provisioned by meshgpu; "
            "cloud fleets need a backend plugin"
        )
    try:
        identities = read_identities(config, text, file)
    except ConfigError as e:
        err.print(str(e), markup=False)
        raise typer.Exit(1) from None
    body = {"configuration": text, "filename": str(file), "identities": identities}
    with client(url) as c:
        doc = c._request("POST", "/api/v1/fleets", json=body).json()  # noqa: SLF001
        out.print(f"fleet [bold]{doc['name']}[/]: {len(doc['hosts'])} host(s)")
        if wait:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                doc = c._request("GET", f"/api/v1/fleets/{doc['name']}").json()  # noqa: SLF001
                if all(h["state"] in ("active", "failed") for h in doc["hosts"]):
                    break
                time.sleep(0.5)
    _print_hosts(doc)


def _print_hosts(doc: dict[str, Any]) -> None:
    table(
        ["HOST", "INSTANCE", "STATE", "NODE", "UPDATED", "REASON"],
        [
            [
                h["hostname"],
                h["instance"],
                h["state"],
                h.get("node") or "-",
                ago(h.get("updated_at")),
                h.get("reason") or "",
            ]
            for h in doc["hosts"]
        ],
    )


@app.command("ls")
def ls(as_json: JsonOpt = False, url: UrlOpt = None) -> None:
    """Fleets and the state of their hosts."""
    with client(url) as c:
        docs = c._request("GET", "/api/v1/fleets").json()  # noqa: SLF001
    if as_json:
        json.dump(docs, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    rows = []
    for f in docs:
        states: dict[str, int] = {}
        for h in f["hosts"]:
            states[h["state"]] = states.get(h["state"], 0) + 1
        rows.append(
            [
                f["name"],
                f["placement"],
                len(f["hosts"]),
                ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "-",
                "deleting" if f["deleting"] else "",
            ]
        )
    table(["FLEET", "PLACEMENT", "HOSTS", "STATES", ""], rows)


@app.command("get")
def get(
    name: Annotated[str, typer.Argument(help="The fleet's name")],
    as_json: JsonOpt = False,
    url: UrlOpt = None,
) -> None:
    """One fleet: each host's state, node and, when it failed, why."""
    with client(url) as c:
        doc = c._request("GET", f"/api/v1/fleets/{name}").json()  # noqa: SLF001
    if as_json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    out.print(f"fleet [bold]{doc['name']}[/] (placement {doc['placement']})")
    _print_hosts(doc)


@app.command("delete")
def delete(
    name: Annotated[str, typer.Argument(help="The fleet's name")],
    host: Annotated[
        list[str] | None, typer.Option("--host", help="Only this host (repeatable)")
    ] = None,
    yes: Annotated[bool, typer.Option("-y", "--yes", help="Do not ask for confirmation")] = False,
    url: UrlOpt = None,
) -> None:
    """Drain the hosts (running jobs get the graceful stop), stop their agents, remove what
    was installed and take them out of the mesh."""
    what = f"host(s) {', '.join(host)} of fleet {name}" if host else f"fleet {name}"
    if not yes and not typer.confirm(f"Delete {what}?", default=False):
        raise typer.Exit(1)
    with client(url) as c:
        c._request("DELETE", f"/api/v1/fleets/{name}", params={"host": host or []})  # noqa: SLF001
    out.print(f"deleting {what}: meshgpu fleet get {name} shows the progress")
