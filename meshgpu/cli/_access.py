"""``meshgpu user|project|secret|audit``: users and their API tokens, projects and members, project
secrets, and the audit trail."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from typing import Annotated, Any

import typer

from meshgpu.cli._common import JsonOpt, UrlOpt, ago, client, fail, out, positive_duration, table

ProjectOpt = Annotated[
    str | None,
    typer.Option(
        "--project", "-p", help="The project (default: the profile's, MESHGPU_PROJECT, main)"
    ),
]

user_app = typer.Typer(help="Users and their API tokens.", no_args_is_help=True)
project_app = typer.Typer(help="Projects, their members and quotas.", no_args_is_help=True)
member_app = typer.Typer(help="A project's members.", no_args_is_help=True)
secret_app = typer.Typer(
    help="Project secrets (${{ secrets.NAME }} in env, registry_auth).", no_args_is_help=True
)
project_app.add_typer(member_app, name="member")

MAX_STDIN_SECRET = 64 << 10


def _project(project: str | None) -> str:
    return project or os.environ.get("MESHGPU_PROJECT") or _profile_project() or "main"


def _profile_project() -> str | None:
    from meshgpu.client import APIError, load_profile

    try:
        return load_profile().project
    except APIError:
        return None


def _print(value: Any) -> None:
    out.print_json(json.dumps(value))


@user_app.command("create")
def user_create(
    name: str,
    admin: Annotated[bool, typer.Option("--admin", help="A global admin")] = False,
    url: UrlOpt = None,
) -> None:
    """Create a user (global admins only); then give it a token: meshgpu user token NAME."""
    with client(url) as c:
        c.call(
            "POST",
            "/api/v1/users",
            json={"name": name, "global_role": "admin" if admin else "user"},
        )
    out.print(f"created user {name}; its token: meshgpu user token {name}")


@user_app.command("ls")
def user_ls(as_json: JsonOpt = False, url: UrlOpt = None) -> None:
    """Users and their tokens (yourself only, unless a global admin)."""
    with client(url) as c:
        users = c.call("GET", "/api/v1/users")
    if as_json:
        _print(users)
        return
    table(
        ["USER", "ROLE", "TOKENS"],
        [
            [
                u["name"],
                u["global_role"],
                ", ".join(t["token_id"] for t in u.get("tokens", [])) or "-",
            ]
            for u in users
        ],
    )


@user_app.command("rm")
def user_rm(name: str, url: UrlOpt = None) -> None:
    """Remove a user: its tokens stop working on every node at once; its runs stay."""
    with client(url) as c:
        c.call("DELETE", f"/api/v1/users/{name}")
    out.print(f"removed user {name}")


@user_app.command("token")
def user_token(
    name: str,
    ttl: Annotated[
        str | None, typer.Option("--ttl", help="Expire after this long (e.g. 30d); default never")
    ] = None,
    revoke: Annotated[
        str | None, typer.Option("--revoke", help="Revoke the token with this id instead")
    ] = None,
    url: UrlOpt = None,
) -> None:
    """Issue an API token for a user (printed once: only its verifier is stored), or revoke one."""
    with client(url) as c:
        if revoke:
            c.call("DELETE", f"/api/v1/user-tokens/{revoke}")
            out.print(f"revoked token {revoke}")
            return
        body = {"ttl_s": positive_duration("--ttl", ttl, "30d")} if ttl else {}
        doc = c.call("POST", f"/api/v1/users/{name}/tokens", json=body)
    print(doc["token"])
    print(
        f"(token id {doc['token_id']}; use it as MESHGPU_TOKEN or token = in ~/.meshgpu/client.toml)",
        file=sys.stderr,
    )


@project_app.command("create")
def project_create(
    name: str,
    max_gpus: Annotated[int | None, typer.Option("--max-gpus", min=0, help="GPU quota")] = None,
    url: UrlOpt = None,
) -> None:
    """Create a project (you become its admin)."""
    with client(url) as c:
        c.call("POST", "/api/v1/projects", json={"name": name, "max_gpus": max_gpus})
    out.print(f"created project {name}")


@project_app.command("ls")
def project_ls(as_json: JsonOpt = False, url: UrlOpt = None) -> None:
    """Your projects: your role, members, GPU quota and GPUs in use."""
    with client(url) as c:
        projects = c.call("GET", "/api/v1/projects")
    if as_json:
        _print(projects)
        return
    table(
        ["PROJECT", "ROLE", "MEMBERS", "GPUS", "RUNS"],
        [
            [
                p["name"],
                p["role"],
                ", ".join(f"{u}:{r}" for u, r in sorted(p["members"].items())) or "-",
                f"{p['gpus_in_use']}/{p['max_gpus']}"
                if p["max_gpus"] is not None
                else str(p["gpus_in_use"]),
                p["active_runs"],
            ]
            for p in projects
        ],
    )


@project_app.command("rm")
def project_rm(name: str, url: UrlOpt = None) -> None:
    """Remove a project (with no active runs) and its secrets."""
    with client(url) as c:
        c.call("DELETE", f"/api/v1/projects/{name}")
    out.print(f"removed project {name}")


@project_app.command("quota")
def project_quota(
    name: str,
    max_gpus: Annotated[
        int | None, typer.Option("--max-gpus", min=0, help="GPU quota (omit: none)")
    ] = None,
    url: UrlOpt = None,
) -> None:
    """Set (or clear) a project's GPU quota."""
    with client(url) as c:
        c.call("PUT", f"/api/v1/projects/{name}/quota", json={"max_gpus": max_gpus})
    out.print(f"project {name}: max_gpus {max_gpus if max_gpus is not None else 'unlimited'}")


@member_app.command("add")
def member_add(
    user: str,
    role: Annotated[str, typer.Option("--role", help="admin, manager or user")] = "user",
    project: ProjectOpt = None,
    url: UrlOpt = None,
) -> None:
    """Add a member to the project (or change its role)."""
    if role not in ("admin", "manager", "user"):
        raise fail(f"--role is admin, manager or user, not {role!r}")
    p = _project(project)
    with client(url) as c:
        c.call("POST", f"/api/v1/projects/{p}/members", json={"user": user, "role": role})
    out.print(f"{user} is a {role} of project {p}")


@member_app.command("rm")
def member_rm(user: str, project: ProjectOpt = None, url: UrlOpt = None) -> None:
    """Remove a member from the project."""
    p = _project(project)
    with client(url) as c:
        c.call("DELETE", f"/api/v1/projects/{p}/members/{user}")
    out.print(f"{user} is no longer a member of project {p}")


@secret_app.command("set")
def secret_set(
    name: str,
    value: Annotated[
        str | None,
        typer.Argument(
            help="The value (default: read from stdin, so it stays out of shell history and ps)"
        ),
    ] = None,
    project: ProjectOpt = None,
    url: UrlOpt = None,
) -> None:
    """Set a project secret; encrypted on the node before it is replicated."""
    if value is None:
        data = sys.stdin.buffer.read(MAX_STDIN_SECRET + 1)
        if len(data) > MAX_STDIN_SECRET:
            raise fail(f"a secret is at most {MAX_STDIN_SECRET} bytes")
        try:
            value = data.decode().removesuffix("\n")
        except UnicodeDecodeError:
            raise fail("a secret is UTF-8 text") from None
    p = _project(project)
    with client(url) as c:
        c.call("PUT", f"/api/v1/projects/{p}/secrets/{name}", json={"value": value})
    out.print(f"set secret {name} in project {p}")


@secret_app.command("get")
def secret_get(name: str, project: ProjectOpt = None, url: UrlOpt = None) -> None:
    """Print a secret's value (project admins and managers)."""
    with client(url) as c:
        doc = c.call("GET", f"/api/v1/projects/{_project(project)}/secrets/{name}")
    print(doc["value"])


@secret_app.command("ls")
def secret_ls(project: ProjectOpt = None, as_json: JsonOpt = False, url: UrlOpt = None) -> None:
    """The project's secret names (never values)."""
    with client(url) as c:
        found = c.call("GET", f"/api/v1/projects/{_project(project)}/secrets")
    if as_json:
        _print(found)
        return
    table(
        ["NAME", "UPDATED", "BY"],
        [[s["name"], ago(s["updated_at"]), s["updated_by"]] for s in found],
    )


@secret_app.command("rm")
def secret_rm(name: str, project: ProjectOpt = None, url: UrlOpt = None) -> None:
    """Remove a project secret."""
    p = _project(project)
    with client(url) as c:
        c.call("DELETE", f"/api/v1/projects/{p}/secrets/{name}")
    out.print(f"removed secret {name} from project {p}")


@secret_app.command("rotate-key")
def secret_rotate_key(as_json: JsonOpt = False, url: UrlOpt = None) -> None:
    """A new cluster data key (global admins). New values use it at once; the leader
    re-encrypts the stored ones in the background and drops the old key when none uses it."""
    with client(url) as c:
        doc = c.call("POST", "/api/v1/secrets/rotate-key")
    if as_json:
        _print(doc)
        return
    out.print(
        f"data key {doc['key_id']} is the primary key; {doc['to_reencrypt']} value(s) to "
        "re-encrypt in the background (meshgpu secret keys shows progress)"
    )


@secret_app.command("keys")
def secret_keys(as_json: JsonOpt = False, url: UrlOpt = None) -> None:
    """The cluster data keys (ids only) and how many values each encrypts (global admins)."""
    with client(url) as c:
        doc = c.call("GET", "/api/v1/secrets/keys")
    if as_json:
        _print(doc)
        return
    table(
        ["KEY", "VALUES", "PRIMARY"],
        [[k, str(n), "yes" if k == doc["primary_key"] else ""] for k, n in doc["keys"].items()],
    )


def _since(text: str) -> float:
    """``--since``: a duration back from now (``2h``, ``7d``) or an ISO date/time."""
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        pass
    return dt.datetime.now().timestamp() - positive_duration("--since", text, "24h or 2026-01-31")


def audit(
    project: Annotated[
        str | None, typer.Option("--project", "-p", help="Only this project")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="A duration back (24h) or a date (2026-01-31)")
    ] = None,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
) -> None:
    """Who did what: submit, stop, secret set, member add, ..."""
    params: dict[str, Any] = {}
    if project:
        params["project"] = project
    if since:
        params["since"] = _since(since)
    with client(url) as c:
        entries = c.call("GET", "/api/v1/audit", params=params)
    if as_json:
        _print(entries)
        return
    table(
        ["TIME", "USER", "ACTION", "PROJECT", "TARGET"],
        [
            [
                dt.datetime.fromtimestamp(e["at"]).isoformat(timespec="seconds"),
                e["user"],
                e["action"],
                e["project"] or "-",
                e["target"] or "-",
            ]
            for e in entries
        ],
    )
