"""The prologue's shell text, run directly (no agent): a local repo staged beside the workspace
moves to its path with its dotfiles, ``if_exists`` decides about a directory that is not empty,
and nothing is emitted when nothing needs doing."""

from __future__ import annotations

import subprocess
from pathlib import Path

from meshgpu.config.spec import FileMap, RepoSpecC, RunSpec
from meshgpu.runner.prologue import layout, needs_prologue, prologue


def _run(spec: RunSpec, work: Path) -> subprocess.CompletedProcess[str]:
    place = layout(spec, work, str(work.parent), has_code=True)
    text = prologue(spec, place, has_code=True) + ' && echo "pwd=$(pwd)"'
    return subprocess.run(["/bin/sh", "-c", text], cwd=work, capture_output=True, text=True)


def _stage(root: Path) -> None:
    (root / "pkg").mkdir(parents=True, exist_ok=True)
    (root / "pkg" / "m.py").write_text("x = 1\n")
    (root / ".env").write_text("dot\n")
    (root / ".meshgpu" / "files").mkdir(parents=True, exist_ok=True)
    (root / ".meshgpu" / "files" / "0").write_text("file-0\n")


def test_a_staged_repo_moves_to_its_path_with_its_dotfiles(tmp_path: Path) -> None:
    work = tmp_path / "job" / "work"
    work.mkdir(parents=True)
    spec = RunSpec(
        repo=RepoSpecC(local_path=".", path="src"), files=(FileMap("f.txt", "src/f.txt"),)
    )
    place = layout(spec, work, None, has_code=True)
    assert place.code_root == str(tmp_path / "job" / "code") and needs_prologue(spec, place)
    _stage(Path(place.code_root))
    r = _run(spec, work)
    assert r.returncode == 0, r.stderr
    assert (work / "src" / "pkg" / "m.py").exists() and (work / "src" / ".env").exists()
    assert (work / "src" / "f.txt").read_text() == "file-0\n"
    assert not (work / "src" / ".meshgpu").exists() and not Path(place.code_root).exists()
    assert f"pwd={work}" in r.stdout


def test_if_exists_error_fails_and_skip_keeps_what_is_there(tmp_path: Path) -> None:
    work = tmp_path / "job" / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "mine.txt").write_text("keep me\n")
    for if_exists in ("error", "skip"):
        spec = RunSpec(repo=RepoSpecC(local_path=".", path="src", if_exists=if_exists))
        _stage(Path(layout(spec, work, None, has_code=True).code_root))
        r = _run(spec, work)
        if if_exists == "error":
            assert r.returncode == 1 and "is not empty (if_exists: error" in r.stderr
        else:
            assert r.returncode == 0 and "left as it is (if_exists: skip)" in r.stdout
            assert sorted(p.name for p in (work / "src").iterdir()) == ["mine.txt"]


def test_nothing_to_do_is_no_prologue(tmp_path: Path) -> None:
    for spec in (RunSpec(), RunSpec(repo=RepoSpecC(local_path="."))):
        place = layout(spec, tmp_path, None, has_code=True)
        assert place.code_root == str(tmp_path) == place.repo_dir == place.working_dir
        assert not needs_prologue(spec, place)
