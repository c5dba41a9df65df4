"""The agent's data directory is its own: directories 0700, files 0600.

It holds the Raft log (every submitted config, env included), the node's TLS key, the admin and
join tokens and the jobs' logs, so no other local user may read any of it. Modes are set where
each file or directory is created (``private_dir``, ``open_private``, ``write_private``), never
through the process umask, which jobs inherit. ``secure_data_dir`` runs once at startup: it
tightens whatever an older version (or a hand) left readable by group or others, with a warning
naming the path and its old mode, and refuses a data dir holding entries another user owns.

The contents of a job's working directory (``jobs/<id>/work``) are the job's own files, created
with its umask; they are left alone (the directories above them are private).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
_LOOSE = 0o077  # group and other bits


class DataDirError(RuntimeError):
    """The data dir cannot be made private (it, or something in it, belongs to another user)."""


def private_dir(path: Path) -> Path:
    """``path`` as a directory of mode 0700 (created if missing; its parents as ``mkdir -p``
    makes them, which outside the data dir is not ours to decide)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        pass
    return path


def open_private(path: str | Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """``os.open`` creating the file with mode 0600; a file that was already there with a
    looser mode is tightened."""
    fd = os.open(path, flags, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & _LOOSE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, data: bytes | str) -> None:
    """Replace ``path`` atomically (a temporary file, then rename) with ``data``, mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(open_private(tmp), "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _is_job_work(rel: tuple[str, ...]) -> bool:
    return len(rel) == 3 and rel[0] == "jobs" and rel[2] == "work"


def secure_data_dir(root: Path) -> list[tuple[Path, int]]:
    """Make ``root`` and everything meshgpu keeps in it private to this user: group and other
    bits are removed, with a warning for each path (and its old mode). Symbolic links are not
    followed. Raises ``DataDirError`` if ``root`` or an entry in it belongs to another user (it
    would stay readable to them, or they could replace it). Returns what was tightened."""
    root = Path(os.path.realpath(root))  # the data dir may be a link to where it lives
    me = os.geteuid()
    tightened: list[tuple[Path, int]] = []

    def visit(path: Path) -> bool:
        """Check and tighten one entry; False if it is gone or a link (not to descend)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False  # a job's file that came and went meanwhile
        if stat.S_ISLNK(st.st_mode):
            return False
        if st.st_uid != me:
            raise DataDirError(
                f"{path} belongs to uid {st.st_uid}, not to the user running the agent (uid "
                f"{me}): the data dir must be this user's alone. Give it to this user (chown "
                f"-R) or choose another --data-dir."
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & _LOOSE:
            new = mode & ~_LOOSE
            try:
                os.chmod(path, new)  # not a link (checked above)
            except FileNotFoundError:
                return False
            log.warning(
                "data dir: %s was readable by other users (mode %04o); now %04o", path, mode, new
            )
            tightened.append((path, mode))
        return stat.S_ISDIR(st.st_mode)

    if not visit(root):
        raise DataDirError(f"{root} is not a directory")
    for top, dirs, files in os.walk(root):
        here = Path(top)
        rel = here.relative_to(root).parts
        for name in files:
            visit(here / name)
        keep = []
        for name in dirs:
            if visit(here / name) and not _is_job_work((*rel, name)):
                keep.append(name)
        dirs[:] = keep
    return tightened
