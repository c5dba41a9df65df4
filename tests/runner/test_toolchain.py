"""Which interpreters and tools a job user can use: every directory on the way searchable and
the file executable for that uid/gid (owner, group or other bits), links followed."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgpu.runner.toolchain import JobUser, Toolchain, discover, usable_by, version_key

OTHER = JobUser(uid=54321, gid=54321)  # owns nothing here


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's own tmp root is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="meshgpu-toolchain-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _tree(tmp_path: Path, dir_mode: int, file_mode: int) -> Path:
    d = tmp_path / "opt" / "bin"
    d.mkdir(parents=True)
    exe = d / "python3.99"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(file_mode)
    (tmp_path / "opt").chmod(dir_mode)
    return exe


def test_a_directory_the_user_cannot_search_hides_what_is_inside(open_dir: Path) -> None:
    tmp_path = open_dir
    exe = _tree(tmp_path, 0o700, 0o755)
    assert not usable_by(exe, OTHER)
    (tmp_path / "opt").chmod(0o711)  # searchable, not listable: enough
    assert usable_by(exe, OTHER)


def test_owner_group_and_other_bits_are_read_for_the_right_user(open_dir: Path) -> None:
    tmp_path = open_dir
    exe = _tree(tmp_path, 0o755, 0o750)
    st = exe.stat()
    assert not usable_by(exe, OTHER)
    assert usable_by(exe, JobUser(uid=OTHER.uid, gid=st.st_gid))  # group x
    assert usable_by(exe, JobUser(uid=OTHER.uid, gid=OTHER.gid, groups=(st.st_gid,)))
    exe.chmod(0o705)
    assert not usable_by(exe, JobUser(uid=OTHER.uid, gid=st.st_gid))  # group bits, not other
    assert usable_by(exe, OTHER)
    assert not usable_by(tmp_path / "opt" / "bin", OTHER)  # a directory is not a program


def test_a_link_counts_only_if_its_target_is_reachable(open_dir: Path) -> None:
    tmp_path = open_dir
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    target = hidden / "python3.99"
    target.write_text("#!/bin/sh\n")
    target.chmod(0o755)
    link = tmp_path / "python3.99"
    link.symlink_to(target)
    assert usable_by(target, JobUser(0, 0)) and not usable_by(link, OTHER)
    hidden.chmod(0o755)
    assert usable_by(link, OTHER)


def test_discovery_finds_an_interpreter_on_path_and_checks_it_runs(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    (bin_dir / f"python{mine}").symlink_to(sys.executable)
    (bin_dir / "python3.98").symlink_to(sys.executable)  # named 3.98, runs as another version
    (bin_dir / "nvcc").write_text("#!/bin/sh\n")
    (bin_dir / "nvcc").chmod(0o755)
    tc = discover(path_env=str(bin_dir), pyenv=False, cuda_globs=())
    assert mine in tc.pythons and "3.98" not in tc.pythons
    assert tc.nvcc == str(bin_dir / "nvcc") and tc.uv is None
    bare = discover(path_env=str(tmp_path / "nothing"), pyenv=False, cuda_globs=())
    assert bare.pythons == {} and bare.nvcc is None


def test_versions_sort_as_numbers() -> None:
    tc = Toolchain(pythons={"3.10": "a", "3.9": "b", "3.12": "c"})
    assert tc.versions() == ["3.9", "3.10", "3.12"]
    assert version_key("3.10") > version_key("3.9")


def test_an_unprivileged_job_user_does_not_get_interpreters_under_a_private_home() -> None:
    """On this host (root's home 0700, pyenv under it): the agent's user finds them, an
    unprivileged job user does not -- and what it does find, it can run (probed as it)."""
    nobody = JobUser.named("nobody")
    if os.geteuid() != 0 or nobody.uid == os.geteuid():
        pytest.skip("needs root and a 'nobody' user")
    private = [p for p in discover().pythons.values() if not usable_by(p, nobody)]
    if not private:
        pytest.skip("no interpreter here is out of an unprivileged user's reach")
    theirs = discover(nobody)
    assert not set(theirs.pythons.values()) & set(private)
    assert all(usable_by(p, nobody) for p in theirs.pythons.values())
