"""``registry_auth`` (dstack): the credentials the container runtime pulls a job's image with.

Per job, never in the runtime's own configuration: a Docker-format ``config.json`` holding one
base64 ``auth`` entry for the image's registry is written, mode 0600, in the job's record
directory (agent-owned, unreadable to jobs) and handed to the runtime for that one ``run``
(``docker --config DIR``, ``podman run --authfile FILE``: ``container.py``); the executor removes
it when the job ends (and a forgotten job's record directory goes with its files).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

from meshgpu.config.interpolation import interpolate

AUTH_DIR = "registry-auth"  # in the job's record directory
AUTH_FILE = "config.json"
# Docker Hub under the names each runtime looks it up by (docker's CLI key, podman's).
DOCKER_HUB = ("https://index.docker.io/v1/", "docker.io")


def image_registry(image: str) -> str:
    """The registry an image reference pulls from (Docker's rule: a first path component with a
    ``.`` or ``:``, or ``localhost``, is a registry host; otherwise Docker Hub)."""
    name = image.split("@", 1)[0]
    first, sep, _ = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def auth_config(image: str, username: str, password: str) -> dict[str, object]:
    """The ``config.json`` document that lets the runtime pull ``image`` as ``username``."""
    # ``$${{`` in the configuration is an escaped ``${{`` (references are refused at submit).
    user = interpolate(username, {}, final=True)
    secret = interpolate(password, {}, final=True)
    token = base64.b64encode(f"{user}:{secret}".encode()).decode()
    registry = image_registry(image)
    keys = DOCKER_HUB if registry == "docker.io" else (registry,)
    return {"auths": {k: {"auth": token} for k in keys}}


def write_auth(record_dir: Path, image: str, auth: tuple[str, str]) -> Path:
    """Write the job's auth file (0600, in a 0700 directory of ``record_dir``); its path."""
    folder = record_dir / AUTH_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / AUTH_FILE
    data = json.dumps(auth_config(image, *auth)).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def remove_auth(record_dir: Path) -> None:
    """Remove the job's auth file (if any)."""
    shutil.rmtree(record_dir / AUTH_DIR, ignore_errors=True)
