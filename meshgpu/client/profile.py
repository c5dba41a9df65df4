"""The client profile (which nodes, which token, which CA) and the client's error: no httpx,
so a lean command (``meshgpu ssh-proxy``, started by ssh for every connection) can read it."""

from __future__ import annotations

import os
import ssl
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class APIError(Exception):
    """A problem-details error from the API (or a transport failure), ready to show a user."""

    def __init__(self, status: int, title: str, detail: str = "", code: str = "") -> None:
        super().__init__(f"{title}: {detail}" if detail else title)
        self.status, self.title, self.detail, self.code = status, title, detail, code


MEMBERS_HEADER = "X-Meshgpu-Members"
PAGE_MAX = 1000  # the largest page a list endpoint answers (``limit``)


@dataclass(frozen=True)
class Profile:
    url: str
    token: str
    # Other nodes' API URLs to fall back on when ``url`` does not answer (any node accepts
    # work); learned from responses and kept in the profile file (``path``) when there is one.
    members: tuple[str, ...] = ()
    path: Path | None = None
    # The cluster CA (PEM) the node's certificate must chain to; None: the system's CAs (a
    # node behind a proxy with a public certificate, or plain http).
    ca: str | None = None
    # The project commands act in (``--project``/``MESHGPU_PROJECT``, else the file's
    # ``project``); None: the server's default (main).
    project: str | None = None

    def verify(self) -> ssl.SSLContext | bool:
        """What httpx checks the node's certificate against."""
        if not self.ca:
            return True
        ctx = ssl.create_default_context(cadata=self.ca)
        # The cluster CA signs member certificates only: one from it is a member of this
        # cluster, whatever address it was reached at (meshgpu/mesh/join.py pinned_context).
        ctx.check_hostname = False
        return ctx


def default_config_path() -> Path:
    return Path(os.environ.get("MESHGPU_CONFIG") or Path.home() / ".meshgpu" / "client.toml")


def load_profile(url: str | None = None, token: str | None = None) -> Profile:
    """``--url``/``MESHGPU_URL``, ``MESHGPU_TOKEN`` and ``MESHGPU_CA`` (a PEM file) win over
    the client profile file."""
    data: dict[str, Any] = {}
    path = default_config_path()
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise APIError(0, f"cannot read the client profile {path}", str(e)) from None
    given = url or os.environ.get("MESHGPU_URL")
    token = token or os.environ.get("MESHGPU_TOKEN") or data.get("token")
    # ``--url``/``MESHGPU_URL`` may list several nodes, comma-separated: the first is asked
    # first, the rest when it does not answer.
    urls = [u.strip().rstrip("/") for u in (given or data.get("url") or "").split(",")]
    urls = [u for u in urls if u]
    if not urls:
        raise APIError(
            0,
            "no meshgpu node to talk to",
            f"start an agent (meshgpu agent) or pass --url / set MESHGPU_URL; looked for {path}",
        )
    members = [*urls[1:]]
    if not given:  # members remembered in the profile belong to the profile's node
        members += [str(m).rstrip("/") for m in data.get("members") or []]
    ca = data.get("ca") or None
    ca_file = os.environ.get("MESHGPU_CA")
    if ca_file:
        try:
            ca = Path(ca_file).read_text()
        except OSError as e:
            raise APIError(0, f"cannot read MESHGPU_CA={ca_file}", str(e)) from None
    project = os.environ.get("MESHGPU_PROJECT") or data.get("project") or None
    return Profile(
        urls[0],
        token or "",
        tuple(dict.fromkeys(m for m in members if m != urls[0])),
        path if path.exists() and not given else None,
        ca,
        str(project) if project else None,
    )


def write_profile(
    path: Path,
    url: str,
    token: str,
    members: tuple[str, ...] | list[str] = (),
    ca: str | None = None,
    project: str | None = None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    text = f'url = "{url}"\ntoken = "{token}"\n'
    if members:
        text += "members = [" + ", ".join(f'"{m}"' for m in members) + "]\n"
    if project:
        text += f'project = "{project}"\n'
    if ca:
        text += f'ca = """\n{ca.strip()}\n"""\n'
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


__all__ = [
    "MEMBERS_HEADER",
    "PAGE_MAX",
    "APIError",
    "Profile",
    "default_config_path",
    "load_profile",
    "write_profile",
]
