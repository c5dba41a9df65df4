"""The errors a user can cause, one hierarchy (httpx's shape): catch ``MeshError`` for all of
them, or one kind. Use cases (``meshgpu/ops``) raise these and never speak HTTP; the API maps
each kind to its problem-details status once (``meshgpu/api/problems.py``), the CLI shows the
title and detail.

Every error carries ``title`` (what happened), ``detail`` (what to do), ``code`` (machine
readable: ``not_found``, ``name_in_use``, ...) and ``extra`` (more fields for the problem
document, e.g. a configuration's located ``issues``)."""

from __future__ import annotations

from typing import Any


class MeshError(Exception):
    """Something the caller asked for that cannot be done as asked."""

    def __init__(self, title: str, detail: str = "", code: str = "", **extra: Any) -> None:
        super().__init__(detail or title)
        self.title, self.detail, self.code, self.extra = title, detail, code, extra


class Invalid(MeshError):
    """The request itself is wrong (a configuration, a flag, a digest): fix it and retry."""


class Denied(MeshError):
    """Refused for who or what is asking (a join token that is spent, expired or revoked)."""


class NotFound(MeshError):
    """No such run, job, token or archive."""


class Conflict(MeshError):
    """Conflicts with the state (a name in use, a run that is not active)."""


class TooLarge(MeshError):
    """Over a limit (an archive that expands too far)."""


class Unavailable(MeshError):
    """Not possible right now (no leader, nothing signed yet): retry shortly."""


class Remote(MeshError):
    """What another member answered to a request forwarded to it, passed on as it came
    (``status`` is the status it answered with)."""

    def __init__(self, status: int, title: str, detail: str = "", code: str = "") -> None:
        super().__init__(title, detail, code)
        self.status = status


def run_not_found(name: str) -> NotFound:
    """The one "run not found" (every route that takes a run name)."""
    return NotFound("run not found", f"no run named {name!r}; see meshgpu ps -a", "not_found")


def job_not_found(name: str, jobs: int) -> NotFound:
    return NotFound("job not found", f"run {name!r} has jobs 0..{jobs - 1}", "not_found")


__all__ = [
    "Conflict",
    "Denied",
    "Invalid",
    "MeshError",
    "NotFound",
    "Remote",
    "TooLarge",
    "Unavailable",
    "job_not_found",
    "run_not_found",
]
