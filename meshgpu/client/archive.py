"""The user's working directory as a code archive: honours ``.gitignore`` (through git when the
directory is a repository, otherwise a built-in subset of the rules), capped in size."""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

DEFAULT_CODE_LIMIT = 64 << 20
_ALWAYS_SKIP = {
    ".git",
    ".venv",
    "__pycache__",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "node_modules",
}


class CodeTooLarge(ValueError):
    """The working directory is bigger than the upload limit."""


def _git_files(root: Path) -> list[str] | None:
    try:
        out = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [p for p in out.decode().split("\0") if p and (root / p).is_file()]


def _ignore_patterns(root: Path) -> list[str]:
    patterns = []
    for name in (".gitignore", ".dstackignore", ".meshgpuignore"):
        f = root / name
        if f.exists():
            for line in f.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#") and not line.startswith("!"):
                    patterns.append(line.rstrip("/"))
    return patterns


def _walk(root: Path) -> list[str]:
    patterns = _ignore_patterns(root)

    def ignored(rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return any(
            fnmatch.fnmatch(rel, p.lstrip("/")) or fnmatch.fnmatch(name, p) for p in patterns
        )

    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(
            d for d in dirnames if d not in _ALWAYS_SKIP and not ignored(rel_dir + d)
        )
        files.extend(rel_dir + f for f in sorted(filenames) if not ignored(rel_dir + f))
    return files


def make_archive(root: str | Path, limit: int = DEFAULT_CODE_LIMIT) -> tuple[bytes, str]:
    """A reproducible ``tar.gz`` of ``root`` and its SHA-256; ``CodeTooLarge`` past ``limit``."""
    root = Path(root)
    files = _git_files(root) if (root / ".git").exists() else None
    if files is None:
        files = _walk(root)
    total = sum((root / f).stat().st_size for f in files)
    if total > limit:
        biggest = sorted(files, key=lambda f: (root / f).stat().st_size, reverse=True)[:3]
        raise CodeTooLarge(
            f"the working directory {root} holds {total / 2**20:.1f} MiB to upload, over the "
            f"{limit / 2**20:.0f} MiB limit; add large files (biggest: {', '.join(biggest)}) to "
            ".gitignore or .dstackignore, or mount data with volumes"
        )
    buf = io.BytesIO()
    # Reproducible: no timestamps (the gzip header's included), owners or order from the disk,
    # so an unchanged directory gives the same archive, hash and stored file every time.
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for f in sorted(files):
            info = tar.gettarinfo(str(root / f), arcname=f)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(root / f, "rb") as fh:
                tar.addfile(info, fh)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def extract_archive(data: bytes, dest: str | Path) -> None:
    """Unpack into ``dest``, refusing paths that escape it."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
