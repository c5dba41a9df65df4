"""What ``apply`` uploads: the repo (``repos`` local_path, relative to the configuration file;
the current directory without ``repos``; nothing for a git URL) and each ``files`` entry under
the archive's reserved ``.meshgpu/files/<n>``, each entry bounded."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from meshgpu.client.upload import UploadRefused, run_archive
from meshgpu.config import parse_config


def _names(upload: tuple[bytes, str] | None) -> set[str]:
    assert upload is not None
    with tarfile.open(fileobj=io.BytesIO(upload[0]), mode="r:gz") as tar:
        return {m.name for m in tar.getmembers()}


def _config(path: Path, text: str):  # type: ignore[no-untyped-def]
    path.write_text(text)
    return parse_config(text, str(path))


def test_repo_and_files_resolve_against_the_configuration_file(tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    (proj / "app" / ".meshgpu").mkdir(parents=True)
    (proj / "app" / "main.py").write_text("print(1)\n")
    (proj / "app" / ".meshgpu" / "x").write_text("reserved: never uploaded as code\n")
    (proj / "data").mkdir()
    (proj / "data" / "a.txt").write_text("a")
    (proj / "data" / "skip.log").write_text("ignored")
    (proj / "data" / ".gitignore").write_text("*.log\n")
    (proj / "one.txt").write_text("1")
    cfg = _config(
        proj / "t.yml",
        "type: task\nrepos: [app]\nfiles: [one.txt, 'data:/d']\ncommands: [ls]\n",
    )
    names = _names(run_archive(cfg, proj / "t.yml", cwd=tmp_path))
    assert names == {
        "main.py",
        ".meshgpu/files/0",
        ".meshgpu/files/1/a.txt",
        ".meshgpu/files/1/.gitignore",
    }


def test_without_repos_the_current_directory_is_uploaded(tmp_path: Path) -> None:
    (tmp_path / "here.txt").write_text("x")
    cfg = _config(tmp_path / "t.yml", "type: task\ncommands: [ls]\n")
    assert "here.txt" in _names(run_archive(cfg, tmp_path / "t.yml", cwd=tmp_path))


def test_a_git_url_repo_uploads_no_code(tmp_path: Path) -> None:
    (tmp_path / "here.txt").write_text("x")
    (tmp_path / "f.txt").write_text("f")
    text = "type: task\nrepos: ['https://example.com/r.git']\ncommands: [ls]\n"
    cfg = _config(tmp_path / "t.yml", text)
    assert run_archive(cfg, tmp_path / "t.yml", cwd=tmp_path) is None
    cfg = _config(tmp_path / "t.yml", text + "files: [f.txt]\n")
    assert _names(run_archive(cfg, tmp_path / "t.yml", cwd=tmp_path)) == {".meshgpu/files/0"}


def test_bad_entries_are_refused_saying_which_and_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(b"x" * 3000)
    cfg = _config(tmp_path / "t.yml", "type: task\nfiles: [big.bin]\ncommands: [ls]\n")
    with pytest.raises(UploadRefused, match=r"files: big.bin holds .* MiB, over the .*volumes"):
        run_archive(cfg, tmp_path / "t.yml", cwd=tmp_path, limit=2048)
    cfg = _config(tmp_path / "t.yml", "type: task\nfiles: [nope.txt]\ncommands: [ls]\n")
    with pytest.raises(UploadRefused, match="files: nope.txt .* does not exist"):
        run_archive(cfg, tmp_path / "t.yml", cwd=tmp_path)
    cfg = _config(tmp_path / "t.yml", "type: task\nrepos: [missing]\ncommands: [ls]\n")
    with pytest.raises(UploadRefused, match="repos: missing .* is not a directory"):
        run_archive(cfg, tmp_path / "t.yml", cwd=tmp_path)
