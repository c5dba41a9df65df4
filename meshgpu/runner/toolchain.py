"""What this host offers a process job's environment: the Python interpreters its job user can
run (for ``python: X.Y``), uv (to make the job's venv), git (to clone a ``repos:`` URL) and a CUDA
toolkit (``nvcc: true``).

Interpreters are looked for where users install them: ``python3.N`` on the agent's ``PATH``
(pyenv's shims left out: they run whichever version pyenv selects, not the one they are named
after), pyenv's ``versions/*`` (``pyenv root``, else ``$PYENV_ROOT`` or ``~/.pyenv``) and uv's
managed Pythons (``uv python list --only-installed``). Jobs run as the job user, not as the
agent: a file counts only if that user can reach and execute it (``usable_by``: every directory
on the way searchable, the file executable, by its owner, group or other bits) -- ``/root`` is
0700, so ``/root/.pyenv`` interpreters do not count for an unprivileged job user. Each candidate
is then run once (as the job user when the agent is root) to read its version and check that it
can make a venv.

Blocking (it runs interpreters): call ``discover`` in a worker thread.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_PYTHON_NAME = re.compile(r"python(3\.\d+)")
_PROBE = "import sys; print('%d.%d' % sys.version_info[:2]); import venv{ensurepip}"
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class JobUser:
    """Who a job runs as: the ids ``usable_by`` checks permissions for."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def current(cls) -> JobUser:
        """The agent's own user: jobs run as it when no job user is set."""
        return cls(os.geteuid(), os.getegid(), tuple(os.getgroups()))

    @classmethod
    def named(cls, name: str | None) -> JobUser:
        """The user ``name`` (its primary and supplementary groups); the agent's own user when
        ``name`` is None or names no user of this host."""
        if not name:
            return cls.current()
        try:
            pw = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
        except KeyError:
            return cls.current()
        try:
            groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
        except OSError:
            groups = (pw.pw_gid,)
        return cls(pw.pw_uid, pw.pw_gid, groups)


@dataclass(frozen=True, slots=True)
class Toolchain:
    pythons: Mapping[str, str] = field(default_factory=dict)  # "3.11" -> interpreter path
    uv: str | None = None
    git: str | None = None
    nvcc: str | None = None

    def versions(self) -> list[str]:
        """The Python versions, oldest first ("3.9" before "3.10")."""
        return sorted(self.pythons, key=version_key)


def version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".") if p.isdigit())


def _allowed(st: os.stat_result, user: JobUser, bits: tuple[int, int, int]) -> bool:
    """Does ``user`` have the permission whose owner/group/other bits are ``bits``?"""
    owner, group, other = bits
    if user.uid == 0:
        # root: any directory; a file only if someone may execute it
        return not stat.S_ISREG(st.st_mode) or bool(st.st_mode & (owner | group | other))
    if st.st_uid == user.uid:
        return bool(st.st_mode & owner)
    if st.st_gid == user.gid or st.st_gid in user.groups:
        return bool(st.st_mode & group)
    return bool(st.st_mode & other)


_X = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)


def _parents(path: str) -> Iterator[str]:
    parts = Path(path).parts
    for i in range(1, len(parts)):
        yield str(Path(*parts[:i]))


def usable_by(path: str | os.PathLike[str], user: JobUser) -> bool:
    """Can ``user`` execute ``path``: every directory on the way to it (as written and once
    links are resolved) searchable, and the file itself executable, for that user's uid/gid."""
    literal = os.path.abspath(path)
    real = os.path.realpath(literal)
    try:
        for d in {*_parents(literal), *_parents(real)}:
            if not _allowed(os.stat(d), user, _X):
                return False
        st = os.stat(real)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and _allowed(st, user, _X)


def _path_candidates(path_env: str) -> Iterator[tuple[str, str]]:
    for d in path_env.split(os.pathsep):
        if not d or "/shims" in d:
            continue
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            m = _PYTHON_NAME.fullmatch(name)
            if m:
                yield m.group(1), os.path.join(d, name)


def pyenv_root(path_env: str) -> str | None:
    pyenv = shutil.which("pyenv", path=path_env)
    if pyenv:
        try:
            out = subprocess.run(
                [pyenv, "root"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    return root if os.path.isdir(root) else None


def _pyenv_candidates(root: str | None) -> Iterator[tuple[str, str]]:
    if not root:
        return
    for d in sorted(glob.glob(os.path.join(root, "versions", "*"))):
        m = re.fullmatch(r"(3\.\d+)\.\d+", os.path.basename(d))
        if m:
            yield m.group(1), os.path.join(d, "bin", f"python{m.group(1)}")


def _uv_candidates(uv: str | None) -> Iterator[tuple[str, str]]:
    if not uv:
        return
    try:
        out = subprocess.run(
            [uv, "python", "list", "--only-installed", "--output-format", "json"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
        )
        entries = json.loads(out.stdout) if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, ValueError):
        return
    for e in entries if isinstance(entries, list) else ():
        parts = e.get("version_parts") or {} if isinstance(e, dict) else {}
        path = e.get("path") if isinstance(e, dict) else None
        if e.get("implementation", "cpython") == "cpython" and path and parts.get("major") == 3:
            yield f"3.{parts.get('minor')}", path


def _probe(interp: str, user: JobUser, need_ensurepip: bool) -> str | None:
    """The interpreter's "3.N" when it runs (as ``user`` when we may switch to it) and can make
    a venv; None otherwise."""
    code = _PROBE.format(ensurepip="; import ensurepip" if need_ensurepip else "")
    kw: dict = {}
    if os.geteuid() == 0 and user.uid != 0:
        kw = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
    try:
        out = subprocess.run(
            [interp, "-I", "-c", code],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            cwd="/",
            env={"PATH": os.defpath, "LANG": "C.UTF-8"},
            **kw,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def discover(
    user: JobUser | None = None,
    path_env: str | None = None,
    pyenv: str | None | bool = True,
    extra: Iterable[tuple[str, str]] = (),
    cuda_globs: Iterable[str] = ("/usr/local/cuda*/bin/nvcc",),
) -> Toolchain:
    """This host's toolchain as ``user`` (default: the agent's own user) can use it.
    ``pyenv``: True finds pyenv's root, a path uses that root, False skips pyenv."""
    user = user or JobUser.current()
    path_env = os.environ.get("PATH", os.defpath) if path_env is None else path_env

    def find(name: str) -> str | None:
        found = shutil.which(name, path=path_env)
        return found if found and usable_by(found, user) else None

    uv = find("uv")
    root = pyenv_root(path_env) if pyenv is True else (pyenv or None)
    pythons: dict[str, str] = {}
    tried: set[str] = set()
    for version, interp in (
        *extra,
        *_path_candidates(path_env),
        *_pyenv_candidates(root),
        *_uv_candidates(uv),
    ):
        if version in pythons or interp in tried:
            continue
        tried.add(interp)
        if not usable_by(interp, user):
            continue
        # Without uv the venv comes from ``-m venv``, which needs ensurepip (Debian splits it
        # out into python3-venv).
        if _probe(interp, user, need_ensurepip=uv is None) == version:
            pythons[version] = interp
    nvcc = find("nvcc")
    if nvcc is None:
        for pattern in cuda_globs:
            nvcc = next((p for p in sorted(glob.glob(pattern)) if usable_by(p, user)), None)
            if nvcc:
                break
    tc = Toolchain(pythons=pythons, uv=uv, git=find("git"), nvcc=nvcc)
    log.info(
        "toolchain for uid %d: python %s; uv %s; git %s; nvcc %s",
        user.uid,
        ", ".join(tc.versions()) or "none",
        uv or "no",
        tc.git or "no",
        nvcc or "no",
    )
    return tc
