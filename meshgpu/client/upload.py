"""What ``apply`` uploads with a run: its code (the repo) and its ``files`` mappings, one archive.

- ``repos: [{local_path: D}]``: the directory ``D`` (relative: to the configuration file's
  directory, as dstack resolves it);
- ``repos: [{url: ...}]``: no code (the host clones the URL);
- no ``repos``: the current directory, as meshgpu always did (dstack 0.20+ uploads nothing
  without ``repos``; meshgpu keeps uploading so that existing configurations keep their code);
- each ``files`` entry ``n`` (a file, or a directory's files) under ``.meshgpu/files/<n>`` of the
  archive, at most ``limit`` bytes per entry (dstack applies its code upload limit to each entry).

``.gitignore`` and ``.dstackignore`` are honoured for directories, as for the code.
"""

from __future__ import annotations

import os
from pathlib import Path

from meshgpu.client.archive import DEFAULT_CODE_LIMIT, list_files, make_archive

FILES_PREFIX = ".meshgpu/files"  # where ``files`` entries travel in the archive (reserved)


class UploadRefused(ValueError):
    """A ``repos`` or ``files`` entry that cannot be uploaded (missing, too large)."""


def _local(base: Path, path: str) -> Path:
    return (base / os.path.expanduser(path)).resolve()


def code_root(config: object, config_path: Path, cwd: Path) -> Path | None:
    """The directory uploaded as the run's code (see the module docstring); None: none."""
    repos = getattr(config, "repos", None) or []
    if not repos:
        return cwd
    repo = repos[0]
    if repo.local_path is None:
        return None
    root = _local(config_path.resolve().parent, repo.local_path)
    if not root.is_dir():
        raise UploadRefused(
            f"repos: {repo.local_path} ({root}) is not a directory; give the repo's directory, "
            "relative to the configuration file"
        )
    return root


def file_entries(
    config: object, config_path: Path, limit: int = DEFAULT_CODE_LIMIT
) -> list[tuple[str, Path]]:
    """``files`` as (path in the archive, file on disk), each entry within ``limit`` bytes."""
    base = config_path.resolve().parent
    out: list[tuple[str, Path]] = []
    for n, mapping in enumerate(getattr(config, "files", None) or []):
        src = _local(base, mapping.local_path)
        prefix = f"{FILES_PREFIX}/{n}"
        if src.is_dir():
            entries = [(f"{prefix}/{f}", src / f) for f in list_files(src)]
        elif src.is_file():
            entries = [(prefix, src)]
        else:
            raise UploadRefused(
                f"files: {mapping.local_path} ({src}) does not exist; local paths are relative "
                "to the configuration file"
            )
        size = sum(p.stat().st_size for _, p in entries)
        if size > limit:
            raise UploadRefused(
                f"files: {mapping.local_path} holds {size / 2**20:.1f} MiB, over the "
                f"{limit / 2**20:.0f} MiB a files entry may upload; mount large data with "
                "volumes instead"
            )
        out.extend(entries)
    return out


def run_archive(
    config: object,
    config_path: Path,
    cwd: Path,
    limit: int = DEFAULT_CODE_LIMIT,
    exclude: list[str] | None = None,
) -> tuple[bytes, str] | None:
    """The run's upload (``make_archive``'s bytes and SHA-256), None when there is nothing to
    upload. ``exclude``: paths relative to the code root left out. Raises ``UploadRefused`` or
    ``CodeTooLarge`` with what to do."""
    root = code_root(config, config_path, cwd)
    extra = file_entries(config, config_path, limit)
    if root is None and not extra:
        return None
    return make_archive(root, limit=limit, exclude=exclude or (), extra=extra)
