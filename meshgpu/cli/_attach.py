"""``meshgpu attach RUN`` and ``meshgpu ssh-proxy RUN[-N]``: plain ``ssh RUN`` (scp, rsync, VS
Code Remote-SSH) into a job through whichever node the user reaches.

``attach`` makes a key pair under ``~/.meshgpu/ssh/`` on first use and registers it, writes
``Host RUN`` / ``Host RUN-N`` entries to ``~/.meshgpu/ssh/config`` (``Include``d from
``~/.ssh/config``, as dstack does with ``~/.dstack/ssh/config``) whose ProxyCommand is
``meshgpu ssh-proxy``, pins the hosts' keys from their node records, forwards the run's
``ports:`` to localhost and streams the job's output until Ctrl-C.

``ssh-proxy`` itself runs from ``meshgpu.cli.main`` without this module (``meshgpu/client/
tunnel.py``); the command here is what ``--help`` shows."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from meshgpu.cli._common import UrlOpt, client, err, fail, out
from meshgpu.client import APIError, Client
from meshgpu.client.profile import default_config_path

WAIT_POLL_S = 1.0
_BEGIN, _END = "# >>> meshgpu run {name} >>>", "# <<< meshgpu run {name} <<<"
_STARTING = {"submitted", "provisioning", "pulling"}


@dataclass(frozen=True)
class SSHFiles:
    """Where attach keeps its files (under ``$HOME``)."""

    home: Path

    @property
    def dir(self) -> Path:
        return self.home / ".meshgpu" / "ssh"

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def config(self) -> Path:
        return self.dir / "config"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def user_config(self) -> Path:
        return self.home / ".ssh" / "config"


def ssh_proxy(
    run: Annotated[str, typer.Argument(help="RUN (job 0) or RUN-N (job N), or a job id")],
    job: Annotated[
        int | None, typer.Option("--job", help="Job number (RUN is then a run name)")
    ] = None,
    url: UrlOpt = None,
) -> None:
    """ssh's ProxyCommand: stdin/stdout to the SSH server of the job's host, through any node
    (written by `meshgpu attach`; try `ssh -o ProxyCommand='meshgpu ssh-proxy RUN' RUN`)."""
    from meshgpu.client.tunnel import main

    argv = (
        [run] + (["--job", str(job)] if job is not None else []) + (["--url", url] if url else [])
    )
    raise typer.Exit(main(argv))


def attach(
    run: Annotated[str, typer.Argument(help="Run name")],
    job: Annotated[int, typer.Option("--job", help="The job that `ssh RUN` reaches")] = 0,
    logs: Annotated[
        bool, typer.Option("--logs/--no-logs", help="Stream the job's output while attached")
    ] = True,
    ports: Annotated[
        bool, typer.Option("--ports/--no-ports", help="Forward the run's ports to localhost")
    ] = True,
    config_only: Annotated[
        bool,
        typer.Option("--config-only", help="Write the SSH configuration and exit (no wait)"),
    ] = False,
    url: UrlOpt = None,
) -> None:
    """Write `Host RUN` to ~/.meshgpu/ssh/config (so `ssh RUN`, scp, VS Code work), forward
    the run's ports and stream its output until Ctrl-C."""
    files = SSHFiles(Path.home())
    with client(url) as c:
        try:
            alias = attach_config(c, run, job, files, url=url)
        except APIError as e:
            raise fail(str(e)) from None
        out.print(f"ssh configuration for [bold]{run}[/] in {files.config}: `ssh {alias}`")
        if config_only:
            return
        try:
            view = wait_running(c, run, job)
        except APIError as e:
            raise fail(str(e)) from None
        code = hold(c, view, job, alias, files, logs=logs, ports=ports)
    raise typer.Exit(code)


def attach_run(c: Client, name: str) -> int:
    """``apply`` of a dev environment attaches as dstack's does: the SSH configuration, the
    ports forwarded, the output streamed until Ctrl-C; the exit code of ``attach``."""
    files = SSHFiles(Path.home())
    try:
        alias = attach_config(c, name, 0, files)
        out.print(f"ssh configuration for [bold]{name}[/] in {files.config}: `ssh {alias}`")
        view = wait_running(c, name, 0)
    except APIError as e:
        err.print(f"[red]cannot attach to {name}:[/] {e}")
        return 1
    return hold(c, view, 0, alias, files, logs=True, ports=True)


# -- the key ---------------------------------------------------------------------------------
def ensure_key(files: SSHFiles) -> str:
    """The public key line of ``~/.meshgpu/ssh/id_ed25519``, made on first use (0600)."""
    pub = files.key.with_name(files.key.name + ".pub")
    if files.key.exists() and pub.exists():
        return pub.read_text().strip()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    files.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = f"{public.decode()} meshgpu@{socket.gethostname()}"
    _write(files.key, private.decode(), 0o600)
    _write(pub, line + "\n", 0o644)
    return line


def register_key(c: Client, public_key: str) -> None:
    """``POST /api/v1/ssh/keys`` (the same key again is no error)."""
    try:
        c.add_ssh_key(public_key, public_key.split()[-1])
    except APIError as e:
        if e.status == 409:  # already registered
            return
        raise


# -- the configuration -----------------------------------------------------------------------
def proxy_command(name: str, job: int, url: str | None) -> str:
    """How ssh starts ``meshgpu ssh-proxy`` for this job: the absolute command (IDEs run ssh
    without the user's shell PATH), the profile in use, ``--url`` if one was given."""
    exe = shutil.which("meshgpu")
    here = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if here is not None and here.name == "meshgpu" and here.exists():
        exe = str(here)
    base = [str(Path(exe).resolve())] if exe else [sys.executable, "-m", "meshgpu"]
    args = [*base, "ssh-proxy", name, "--job", str(job)]
    if url:
        args += ["--url", url]
    cmd = shlex.join(args)
    profile = default_config_path()
    if profile.exists():
        # ssh runs ``exec <ProxyCommand>``: the variable goes through env(1)
        cmd = f"env MESHGPU_CONFIG={shlex.quote(str(profile.resolve()))} {cmd}"
    return cmd.replace("%", "%%")  # ssh expands %-tokens in ProxyCommand


# AES-GCM first: the agent's SSH server (asyncssh) moves data through AES-GCM (AES-NI, one
# AEAD call per packet) at about 1.5x its ChaCha20-Poly1305 rate, which OpenSSH's client would
# otherwise pick first. An explicit list (not "^..."), known to every OpenSSH since 6.5.
CIPHERS = ",".join(
    [
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "chacha20-poly1305@openssh.com",
        "aes128-ctr",
        "aes192-ctr",
        "aes256-ctr",
    ]
)


def host_key_alias(cluster_id: str) -> str:
    return f"meshgpu-{re.sub(r'[^A-Za-z0-9._-]', '', cluster_id)[:40] or 'cluster'}"


def config_block(
    name: str, jobs: int, default_job: int, files: SSHFiles, alias: str, url: str | None
) -> str:
    """The ``Host`` entries of one run: ``RUN`` (job ``default_job``) and ``RUN-N`` per job.
    Every node's host key is pinned under one alias (``HostKeyAlias``), so a job that moves
    to another host of the cluster is still trusted, and nothing else is."""
    lines = [_BEGIN.format(name=name)]
    entries = [(name, default_job)] + [(f"{name}-{n}", n) for n in range(jobs)]
    for host, num in entries:
        lines += [
            f"Host {host}",
            f"    HostName {host}",
            # Job 0 by the run's own name (an exact run name wins over RUN-N on the server).
            f"    User {name if num == 0 else f'{name}-{num}'}",
            f"    ProxyCommand {proxy_command(name, num, url)}",
            f"    IdentityFile {_cfg_path(files.key)}",
            "    IdentitiesOnly yes",
            f"    HostKeyAlias {alias}",
            f"    UserKnownHostsFile {_cfg_path(files.known_hosts)}",
            "    StrictHostKeyChecking yes",
            f"    Ciphers {CIPHERS}",
            "    ServerAliveInterval 30",
            "",
        ]
    lines.append(_END.format(name=name))
    return "\n".join(lines) + "\n"


def replace_block(text: str, name: str, block: str | None) -> str:
    """``text`` with run ``name``'s entries replaced by ``block`` (None: removed)."""
    begin, end = _BEGIN.format(name=name), _END.format(name=name)
    out_lines: list[str] = []
    skipping = False
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == begin:
            skipping = True
            continue
        if skipping:
            if line.rstrip("\n") == end:
                skipping = False
            continue
        out_lines.append(line)
    kept = "".join(out_lines)
    if block is None:
        return kept
    if kept and not kept.endswith("\n"):
        kept += "\n"
    return kept + block


def known_hosts_text(existing: str, alias: str, host_keys: list[str]) -> str:
    """``existing`` less this cluster's lines, plus one line per node host key."""
    kept = [ln for ln in existing.splitlines() if ln.split(" ", 1)[0] != alias and ln.strip()]
    keys = []
    for k in host_keys:
        parts = k.split()
        if len(parts) >= 2:
            keys.append(f"{alias} {parts[0]} {parts[1]}")
    return "\n".join([*kept, *dict.fromkeys(keys)]) + "\n"


def include_line(files: SSHFiles) -> str:
    return f"Include {_cfg_path(files.config)}"


def ensure_include(files: SSHFiles) -> None:
    """``Include ~/.meshgpu/ssh/config`` at the top of ``~/.ssh/config`` (before any ``Host``:
    an Include inside a Host block would only apply to that host)."""
    line = include_line(files)
    path = files.user_config
    text = path.read_text() if path.exists() else ""
    if any(ln.strip() == line for ln in text.splitlines()):
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(path, f"{line}\n\n{text}" if text else f"{line}\n", 0o600)


def attach_config(c: Client, name: str, job: int, files: SSHFiles, url: str | None = None) -> str:
    """Key, registration, ``Host`` entries, pinned host keys, the Include: ``ssh`` is ready.
    Returns the host name to ssh to."""
    view = c.run(name)
    jobs = view.get("jobs") or []
    if not 0 <= job < len(jobs):
        raise APIError(404, "job not found", f"run {name!r} has jobs 0..{len(jobs) - 1}")
    register_key(c, ensure_key(files))
    cluster_id = str(c.status().get("cluster_id") or "cluster")
    alias = host_key_alias(cluster_id)
    host_keys = [n["ssh_host_key"] for n in c.nodes() if n.get("ssh_host_key")]
    files.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = files.known_hosts.read_text() if files.known_hosts.exists() else ""
    _write(files.known_hosts, known_hosts_text(old, alias, host_keys), 0o644)
    text = files.config.read_text() if files.config.exists() else ""
    block = config_block(name, len(jobs), job, files, alias, url)
    _write(files.config, replace_block(text, name, block), 0o600)
    ensure_include(files)
    return name


# -- attached --------------------------------------------------------------------------------
def wait_running(c: Client, name: str, job: int) -> dict[str, Any]:
    """The run once its job ``job`` runs; APIError if it ended first."""
    said = None
    while True:
        view = c.run(name)
        jobs = view.get("jobs") or []
        if not 0 <= job < len(jobs):
            raise APIError(404, "job not found", f"run {name!r} has jobs 0..{len(jobs) - 1}")
        status = jobs[job]["status"]
        if status == "running":
            return view
        if status not in _STARTING:
            reason = jobs[job].get("termination_reason") or status
            raise APIError(409, "job not running", f"{name} job {job} is {status} ({reason})")
        if status != said:
            err.print(f"waiting for {name} job {job} to run ({status})...")
            said = status
        time.sleep(WAIT_POLL_S)


def port_forwards(view: dict[str, Any], job: int = 0) -> list[tuple[int | None, int]]:
    """(local port or None for any, job port) for the run's ``ports:`` (a task group's own, for
    a job of that group) and a service's port."""
    from meshgpu.config.common import PortMapping

    config = view.get("config") or {}
    found: list[tuple[int | None, int]] = []
    raw = list(config.get("ports") or [])
    jobs = view.get("jobs") or []
    group = jobs[job].get("group") if 0 <= job < len(jobs) else None
    if view.get("type") == "task":
        for g in config.get("groups") or ():
            if isinstance(g, dict) and g.get("name") == group:
                raw.extend(g.get("ports") or ())
    if view.get("type") == "service" and config.get("port") is not None:
        raw.append(config["port"])
    for p in raw:
        try:
            m = p if isinstance(p, PortMapping) else PortMapping.model_validate(p)
        except ValueError:
            continue
        found.append((m.local_port, m.container_port))
    return list(dict.fromkeys(found))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hold(
    c: Client,
    view: dict[str, Any],
    job: int,
    alias: str,
    files: SSHFiles,
    *,
    logs: bool,
    ports: bool,
) -> int:
    """Forward ports (one ``ssh -N -L ...`` through the tunnel) and stream the output until
    Ctrl-C or the job's end."""
    name = view["name"]
    forwarder = None
    forwards = [(lp or _free_port(), rp) for lp, rp in port_forwards(view, job)] if ports else []
    ssh = shutil.which("ssh")
    if forwards and ssh is None:
        err.print("no ssh client: not forwarding ports")
    elif forwards:
        args = [ssh, "-F", str(files.config), "-N", "-o", "ExitOnForwardFailure=yes"]
        for lp, rp in forwards:
            args += ["-L", f"127.0.0.1:{lp}:127.0.0.1:{rp}"]
        forwarder = subprocess.Popen([*args, f"{name}-{job}"], stdin=subprocess.DEVNULL)
        for lp, rp in forwards:
            out.print(f"forwarding localhost:{lp} -> {name} job {job} port {rp}")
    try:
        if logs:
            for chunk in c.logs(name, job=job, follow=True):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        else:
            while True:
                time.sleep(2.0)
                if forwarder is not None and forwarder.poll() is not None:
                    err.print("the port forwarding ended")
                    return 1
                status = (c.run(name).get("jobs") or [{}] * (job + 1))[job].get("status")
                if status != "running":
                    out.print(f"{name} job {job} is {status}")
                    return 0
    except KeyboardInterrupt:
        return 0
    except APIError as e:
        err.print(f"error: {e}")
        return 1
    finally:
        if forwarder is not None and forwarder.poll() is None:
            forwarder.send_signal(signal.SIGTERM)
            try:
                forwarder.wait(5)
            except subprocess.TimeoutExpired:
                forwarder.kill()
    return 0


def _cfg_path(p: Path) -> str:
    """A path as ssh_config reads it (quoted when it has spaces)."""
    s = str(p.resolve() if p.exists() else p.absolute())
    return f'"{s}"' if " " in s else s


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    tmp.replace(path)
