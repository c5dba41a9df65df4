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

app = typer.Typer(
    help="Fleets: SSH hosts the mesh installs its agent on, and backend (cloud) fleets the "
    "leader buys instances for.",
    no_args_is_help=True,
)
backend_app = typer.Typer(
    help="Backends: where backend fleets buy instances (plugins of meshgpu.backends).",
    no_args_is_help=True,
)


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
    if config.ssh_config is None:  # a backend fleet: instances come when runs need them
        body = {"configuration": text, "filename": str(file), "identities": {}}
        with client(url) as c:
            doc = c._request("POST", "/api/v1/fleets", json=body).json()  # noqa: SLF001
        nodes = doc.get("nodes") or {}
        out.print(
            f"fleet [bold]{doc['name']}[/]: backend fleet, nodes {nodes.get('min', 0)}.."
            f"{'' if nodes.get('max') is None else nodes['max']}"
        )
        _print_instances(doc)
        return
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


def _print_instances(doc: dict[str, Any]) -> None:
    if not doc.get("instances"):
        return
    table(
        [
            "INSTANCE",
            "BACKEND",
            "REGION",
            "TYPE",
            "GPUS",
            "SPOT",
            "PRICE",
            "STATUS",
            "NODE",
            "REASON",
        ],
        [
            [
                i["name"],
                i["backend"],
                i["region"],
                i["instance_type"],
                i["gpus"],
                "spot" if i["spot"] else "on-demand",
                "-" if i["price"] is None else f"${i['price']:g}",
                i["state"],
                i.get("node") or "-",
                i.get("reason") or "",
            ]
            for i in doc["instances"]
        ],
    )


def _print_hosts(doc: dict[str, Any]) -> None:
    if doc.get("kind") == "backend":
        _print_instances(doc)
        return
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
        members = f["hosts"] if f.get("kind") != "backend" else f.get("instances", [])
        for h in members:
            states[h["state"]] = states.get(h["state"], 0) + 1
        nodes = f.get("nodes") or {}
        rows.append(
            [
                f["name"],
                "ssh" if f.get("kind") != "backend" else "backend",
                f["placement"],
                len(members),
                "-"
                if not nodes
                else f"{nodes.get('min', 0)}..{'' if nodes.get('max') is None else nodes['max']}",
                ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "-",
                "deleting" if f["deleting"] else "",
            ]
        )
    table(["FLEET", "KIND", "PLACEMENT", "HOSTS", "NODES", "STATES", ""], rows)
    for f in docs:
        if f.get("instances"):
            out.print(f"fleet [bold]{f['name']}[/]")
            _print_instances(f)


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


def _settings(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise fail(f"{what} takes key=value (e.g. {what} region=us-east-1); got {item!r}")
        out[k.strip()] = v
    return out


@backend_app.command("add")
def backend_add(
    type_: Annotated[str, typer.Argument(metavar="TYPE", help="The plugin: local, aws, ...")],
    name: Annotated[str | None, typer.Option("--name", help="Its name (default: TYPE)")] = None,
    bridge: Annotated[
        str | None, typer.Option("--bridge", help="local: attach instances to this bridge")
    ] = None,
    option: Annotated[
        list[str] | None, typer.Option("-o", "--option", help="key=value setting (repeatable)")
    ] = None,
    secret: Annotated[
        list[str] | None,
        typer.Option("--secret", help="key=value credential, sealed to the voters (repeatable)"),
    ] = None,
    url: UrlOpt = None,
) -> None:
    """Configure a backend; its credentials are checked before they are stored."""
    config = _settings(option, "-o")
    if bridge:
        config["bridge"] = bridge
    body = {
        "name": name or type_,
        "type": type_,
        "config": config,
        "secrets": _settings(secret, "--secret"),
    }
    with client(url) as c:
        doc = c._request("POST", "/api/v1/backends", json=body).json()  # noqa: SLF001
    out.print(f"backend [bold]{doc['name']}[/] ({doc['type']}) added")


@backend_app.command("ls")
def backend_ls(as_json: JsonOpt = False, url: UrlOpt = None) -> None:
    """The configured backends (never their secrets)."""
    with client(url) as c:
        docs = c._request("GET", "/api/v1/backends").json()  # noqa: SLF001
    if as_json:
        json.dump(docs, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    table(
        ["BACKEND", "TYPE", "SETTINGS", "SECRETS", "INSTANCES"],
        [
            [
                d["name"],
                d["type"],
                ", ".join(f"{k}={v}" for k, v in sorted(d["config"].items())) or "-",
                d["secrets"],
                d["instances"],
            ]
            for d in docs
        ],
    )


@backend_app.command("rm")
def backend_rm(
    name: Annotated[str, typer.Argument(help="The backend's name")], url: UrlOpt = None
) -> None:
    """Remove a backend (refused while it has instances)."""
    with client(url) as c:
        c._request("DELETE", f"/api/v1/backends/{name}")  # noqa: SLF001
    out.print(f"backend {name} removed")
