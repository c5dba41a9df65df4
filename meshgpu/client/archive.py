"""The user's working directory as a code archive: honours ``.gitignore`` (through git when the
directory is a repository, otherwise a built-in subset of the rules), capped in size.

An archive from elsewhere is never trusted: ``check_archive`` streams through it (no files
written) and ``extract_archive`` unpacks it, both refusing with ``ArchiveRefused`` one that
expands past ``ArchiveLimits`` (bytes, entries), holds a path or link that leaves the working
directory, or a device, FIFO or sparse file. Both are blocking: call them in a worker thread.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

DEFAULT_CODE_LIMIT = 64 << 20
# What an archive may expand to, as a multiple of the upload limit (1 GiB for 64 MiB), and how
# many entries (files, directories, links) it may hold. See docs/operations.md.
EXPANSION_FACTOR = 16
DEFAULT_MAX_FILES = 100_000
_MAX_META = 1 << 20  # a pax or GNU long-name header (a path is at most a few KiB)
_PER_ENTRY = 4 << 10  # tar overhead an entry may add to the stream (header, pax, padding)
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


class ArchiveRefused(ValueError):
    """A code archive that will not be unpacked. ``status`` is the HTTP status that says so
    (413: it expands too far; 400: it is malformed or unsafe), ``code`` the problem code."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_archive") -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    """How far an archive may expand: ``max_bytes`` of file contents, ``max_files`` entries."""

    max_bytes: int = DEFAULT_CODE_LIMIT * EXPANSION_FACTOR
    max_files: int = DEFAULT_MAX_FILES

    @classmethod
    def for_upload_limit(
        cls, code_limit: int, max_bytes: int | None = None, max_files: int | None = None
    ) -> ArchiveLimits:
        """The defaults for an upload limit: ``EXPANSION_FACTOR`` times it, and
        ``DEFAULT_MAX_FILES`` entries."""
        return cls(
            max_bytes if max_bytes is not None else code_limit * EXPANSION_FACTOR,
            max_files if max_files is not None else DEFAULT_MAX_FILES,
        )


@dataclass(frozen=True, slots=True)
class ArchiveSummary:
    files: int  # entries: files, directories and links
    bytes: int  # file contents, expanded


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


def list_files(root: str | Path) -> list[str]:
    """The files of ``root`` an upload takes (relative paths): ``.gitignore`` and
    ``.dstackignore`` honoured."""
    root = Path(root)
    files = _git_files(root) if (root / ".git").exists() else None
    return _walk(root) if files is None else files


def make_archive(
    root: str | Path | None,
    limit: int = DEFAULT_CODE_LIMIT,
    exclude: Iterable[str] = (),
    extra: Iterable[tuple[str, Path]] = (),
) -> tuple[bytes, str]:
    """A reproducible ``tar.gz`` of ``root`` and its SHA-256; ``CodeTooLarge`` past ``limit``.
    ``exclude``: paths relative to ``root`` left out (a service's own configuration file).
    ``extra``: more files, as (path in the archive, file on disk) -- ``files:`` mappings under
    the reserved ``.meshgpu/`` directory, which ``root``'s own files never use. ``root`` None:
    only those."""
    entries: dict[str, Path] = {}
    if root is not None:
        root = Path(root)
        files = list_files(root)
        skip = {Path(e).as_posix() for e in exclude}
        for f in files:
            rel = Path(f).as_posix()
            if rel not in skip and rel.split("/", 1)[0] != ".meshgpu":
                entries[f] = root / f
    entries.update((name, Path(src)) for name, src in extra)
    total = sum(p.stat().st_size for p in entries.values())
    if total > limit:
        biggest = sorted(entries, key=lambda f: entries[f].stat().st_size, reverse=True)[:3]
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
        for f in sorted(entries):
            info = tar.gettarinfo(str(entries[f]), arcname=f)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(entries[f], "rb") as fh:
                tar.addfile(info, fh)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit} ({n} bytes)"
    return f"{n} bytes"


class _Capped(io.RawIOBase):
    """The decompressed stream, refused past ``cap`` bytes: tar headers and padding count too,
    so no archive costs more than that much inflating, whatever its headers claim."""

    def __init__(self, raw: BinaryIO, cap: int, limits: ArchiveLimits) -> None:
        self._gz = gzip.GzipFile(fileobj=raw, mode="rb")
        self._left = cap
        self._limits = limits

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        n = min(n if n >= 0 else 1 << 16, self._left + 1)
        try:
            data = self._gz.read(n)
        except (OSError, EOFError, zlib.error) as e:
            raise ArchiveRefused(f"not a gzip-compressed tar archive: {e}") from None
        self._left -= len(data)
        if self._left < 0:
            raise ArchiveRefused(
                f"the archive expands to more than {_size(self._limits.max_bytes)} "
                f"(with its tar headers), the most a code archive may hold",
                413,
                "archive_too_large",
            )
        return data


class _CheckedInfo(tarfile.TarInfo):
    """Refuses an oversized pax or GNU long-name header before tarfile reads it into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _META_TYPES and self.size > _MAX_META:
            raise ArchiveRefused(
                f"the archive has a {self.size}-byte extended header (at most {_MAX_META})"
            )
        return super()._proc_member(tarfile_)  # type: ignore[misc]


_META_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
_CHECK_ROOT = "/nonexistent/meshgpu-archive-check"  # where a checked archive "unpacks"


def _members(
    tar: tarfile.TarFile, limits: ArchiveLimits, dest: str, totals: list[int]
) -> Iterator[tarfile.TarInfo]:
    """``tar``'s entries, each checked as it comes (``totals``: entries, bytes so far)."""
    while True:
        try:
            member = tar.next()
        except ArchiveRefused:
            raise
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ArchiveRefused(f"not a valid tar.gz archive: {e}") from None
        if member is None:
            return
        totals[0] += 1
        if totals[0] > limits.max_files:
            raise ArchiveRefused(
                f"the archive holds more than {limits.max_files} files and directories, the "
                "most a code archive may hold",
                413,
                "archive_too_large",
            )
        if member.name.startswith("/") or os.path.isabs(member.name):
            raise ArchiveRefused(f"{member.name!r} is an absolute path (not allowed)")
        if member.issparse():
            raise ArchiveRefused(f"{member.name!r} is a sparse file (not supported)")
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise ArchiveRefused(
                f"{member.name!r} is a device, FIFO or other special file (not allowed)"
            )
        try:
            tarfile.data_filter(member, dest)
        except tarfile.FilterError as e:
            raise ArchiveRefused(f"unsafe entry: {e}") from None
        if member.isreg():
            totals[1] += member.size
            if totals[1] > limits.max_bytes:
                raise ArchiveRefused(
                    f"the archive expands to more than {_size(limits.max_bytes)} (at "
                    f"{member.name!r}), the most a code archive may hold",
                    413,
                    "archive_too_large",
                )
        yield member


def _open(source: bytes | str | Path | BinaryIO) -> tuple[BinaryIO, bool]:
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(source), True
    if isinstance(source, str | Path):
        return open(source, "rb"), True  # noqa: SIM115 - closed by the caller
    return source, False


def _stream(raw: BinaryIO, limits: ArchiveLimits) -> tarfile.TarFile:
    cap = limits.max_bytes + limits.max_files * _PER_ENTRY + (1 << 20)
    try:
        return tarfile.open(fileobj=_Capped(raw, cap, limits), mode="r|", tarinfo=_CheckedInfo)
    except ArchiveRefused:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ArchiveRefused(f"not a valid tar.gz archive: {e}") from None


def check_archive(
    source: bytes | str | Path | BinaryIO, limits: ArchiveLimits | None = None
) -> ArchiveSummary:
    """Walk the archive's headers (inflating it, writing nothing) and apply every check that
    ``extract_archive`` applies; ``ArchiveRefused`` says which failed. Blocking."""
    limits = limits or ArchiveLimits()
    raw, own = _open(source)
    totals = [0, 0]
    try:
        with _stream(raw, limits) as tar:
            for _ in _members(tar, limits, _CHECK_ROOT, totals):
                pass
    finally:
        if own:
            raw.close()
    return ArchiveSummary(totals[0], totals[1])


def extract_archive(
    source: bytes | str | Path | BinaryIO, dest: str | Path, limits: ArchiveLimits | None = None
) -> ArchiveSummary:
    """Unpack into ``dest`` (made if missing), streaming, checking every entry before it is
    written. On ``ArchiveRefused`` (or any error) ``dest`` is removed with what was unpacked.
    Blocking."""
    limits = limits or ArchiveLimits()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    raw, own = _open(source)
    totals = [0, 0]
    try:
        with _stream(raw, limits) as tar:
            root = os.path.realpath(dest)
            try:
                tar.extractall(dest, members=_members(tar, limits, root, totals), filter="data")
            except ArchiveRefused:
                raise
            except (tarfile.TarError, EOFError, zlib.error) as e:
                raise ArchiveRefused(f"not a valid tar.gz archive: {e}") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    finally:
        if own:
            raw.close()
    return ArchiveSummary(totals[0], totals[1])
