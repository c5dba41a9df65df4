"""The job's environment, seen from inside the job (a real agent, its CLI): ``python: X.Y`` runs
that interpreter in a venv, ``repos`` (a local directory, a git URL with a branch or a commit)
land where ``path`` says with ``DSTACK_REPO_DIR`` naming them, ``files`` are placed at their paths
and ``working_dir`` is where the commands run. A version no host has is named in why-pending."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgpu.runner.toolchain import discover
from meshgpu.testing import AgentProcess
from tests.agent.conftest import wait_for


def _apply(agent: AgentProcess, cfg: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return agent.cli("apply", "-f", str(cfg), "-y", cwd=cwd)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """An absolute path outside the job's workspace (removed afterwards)."""
    d = Path("/tmp") / f"meshgpu-envtest-{uuid.uuid4().hex[:10]}"
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_python_runs_the_requested_interpreter_in_a_venv(
    agent: AgentProcess, tmp_path: Path
) -> None:
    # The agent's job user is the agent's own user here: every interpreter it can run counts.
    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    others = [v for v in discover().versions() if v != mine]
    if not others:
        pytest.skip(f"this host has no Python other than the agent's own {mine}")
    version = others[-1]
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "task.dstack.yml").write_text(
        f"""
type: task
name: py
python: "{version}"
commands:
  - python -V
  - echo "venv=$DSTACK_VENV_DIR mvenv=$MESHGPU_VENV_DIR virtual=$VIRTUAL_ENV"
  - echo "python=$(command -v python)"
  - python -c "import sys; print('prefix', sys.prefix != sys.base_prefix)"
  - echo "pwd=$(pwd) repo=$DSTACK_REPO_DIR wd=$DSTACK_WORKING_DIR"
"""
    )
    r = _apply(agent, proj / "task.dstack.yml", proj)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Python {version}." in r.stdout
    venv = next(line for line in r.stdout.splitlines() if line.startswith("venv=")).split()[0][5:]
    assert venv and f"mvenv={venv} virtual={venv}" in r.stdout
    assert f"python={venv}/bin/python" in r.stdout and "prefix True" in r.stdout
    # Without repos the uploaded directory is the repo, at the working directory.
    line = next(x for x in r.stdout.splitlines() if x.startswith("pwd="))
    pwd = line.split()[0][4:]
    assert line == f"pwd={pwd} repo={pwd} wd={pwd}"


def test_a_python_no_host_has_is_named_in_why_pending(agent: AgentProcess) -> None:
    have = set(discover().versions())
    missing = next(v for v in (f"3.{m}" for m in range(9, 16)) if v not in have)
    c = agent.client()
    c.submit(f'type: task\npython: "{missing}"\ncommands: [python -V]\n', name="nopy")
    why = wait_for(lambda: c.run("nopy")["jobs"][0].get("why_pending"))
    assert f"has no Python {missing} (it has " in why
    assert c.run("nopy")["status"] == "submitted"
    c.stop("nopy", abort=True)


def test_repo_files_and_working_dir(agent: AgentProcess, tmp_path: Path, scratch: Path) -> None:
    proj = tmp_path / "proj"
    (proj / "app" / "pkg").mkdir(parents=True)
    (proj / "app" / "main.txt").write_text("main-of-the-repo\n")
    (proj / "app" / "pkg" / ".hidden").write_text("dotfile-too\n")
    (proj / "data" / "tree").mkdir(parents=True)
    (proj / "data" / "cfg.txt").write_text("mapped-file\n")
    (proj / "data" / "tree" / "x.txt").write_text("mapped-dir\n")
    (proj / "secret.txt").write_text("absolute-target\n")
    (proj / "outside.txt").write_text("not-in-the-repo\n")
    wd = scratch / "wd"
    (proj / "task.dstack.yml").write_text(
        f"""
type: task
name: env
working_dir: {wd}
repos:
  - local_path: app
    path: src
files:
  - data/cfg.txt:conf/cfg.txt
  - data/tree:tree
  - secret.txt:{scratch}/abs/s.txt
commands:
  - echo "pwd=$(pwd)"
  - echo "repo=$DSTACK_REPO_DIR mrepo=$MESHGPU_REPO_DIR wd=$DSTACK_WORKING_DIR"
  - cat src/main.txt src/pkg/.hidden conf/cfg.txt tree/x.txt {scratch}/abs/s.txt
  - test ! -e src/outside.txt && test ! -e src/.meshgpu && echo only-the-repo
"""
    )
    # From another directory: local paths are relative to the configuration file.
    r = _apply(agent, proj / "task.dstack.yml", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"pwd={wd}" in r.stdout
    assert f"repo={wd}/src mrepo={wd}/src wd={wd}" in r.stdout
    for text in ("main-of-the-repo", "dotfile-too", "mapped-file", "mapped-dir", "absolute-target"):
        assert text in r.stdout
    assert "only-the-repo" in r.stdout


def test_a_files_target_the_job_cannot_write_fails_the_job_saying_so(
    agent: AgentProcess, tmp_path: Path, scratch: Path
) -> None:
    scratch.mkdir()
    (scratch / "blocker").write_text("a file, not a directory")
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "t.yml").write_text(
        f"type: task\nfiles: ['f.txt:{scratch}/blocker/f.txt']\ncommands: [echo never]\n"
    )
    r = _apply(agent, tmp_path / "t.yml", tmp_path)
    assert r.returncode != 0 and "never" not in r.stdout
    assert f"meshgpu: files: cannot place f.txt at {scratch}/blocker/f.txt as" in r.stdout


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_git_url_repo_is_cloned_at_its_branch_or_commit(
    agent: AgentProcess, tmp_path: Path, scratch: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _git("init", "-q", "-b", "main", cwd=src)
    _git("config", "user.email", "t@example.com", cwd=src)
    _git("config", "user.name", "t", cwd=src)
    (src / "v.txt").write_text("one\n")
    _git("add", ".", cwd=src)
    _git("commit", "-q", "-m", "one", cwd=src)
    first = _git("rev-parse", "HEAD", cwd=src)
    _git("checkout", "-q", "-b", "feat", cwd=src)
    (src / "v.txt").write_text("feature\n")
    _git("commit", "-q", "-am", "feat", cwd=src)
    bare = tmp_path / "origin.git"
    _git("clone", "-q", "--bare", str(src), str(bare), cwd=tmp_path)
    url = f"file://{bare}"
    (tmp_path / "branch.yml").write_text(
        f"""
type: task
name: branch
repos:
  - url: {url}
    branch: feat
commands:
  - echo "v=$(cat v.txt) repo=$DSTACK_REPO_DIR pwd=$(pwd)"
"""
    )
    r = _apply(agent, tmp_path / "branch.yml", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("v="))
    pwd = line.rsplit("pwd=", 1)[1]
    assert line == f"v=feature repo={pwd} pwd={pwd}"
    (tmp_path / "hash.yml").write_text(
        f"""
type: task
name: pinned
repos:
  - url: {url}
    hash: {first}
    path: {scratch}/clone
commands:
  - echo "v=$(cat $DSTACK_REPO_DIR/v.txt) head=$(git -C $DSTACK_REPO_DIR rev-parse HEAD)"
"""
    )
    r = _apply(agent, tmp_path / "hash.yml", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"v=one head={first}" in r.stdout
    # The same path again: not empty, and if_exists defaults to error.
    r = _apply(agent, tmp_path / "hash.yml", tmp_path)
    assert (
        r.returncode != 0 and f"repos: {scratch}/clone is not empty (if_exists: error" in r.stdout
    )


def test_the_host_registers_its_toolchain_and_nvcc_runs_where_it_is(agent: AgentProcess) -> None:
    here = discover()
    node = agent.client().nodes()[0]
    assert node["pythons"] == here.versions() and node["nvcc"] is (here.nvcc is not None)
    if here.nvcc is None:
        pytest.skip("no CUDA toolkit on this host")
    c = agent.client()
    c.submit("type: task\nnvcc: true\ncommands: [command -v nvcc]\n", name="cc")
    wait_for(lambda: c.run("cc")["status"] == "done")
    assert b"".join(c.logs("cc")).decode().strip().endswith("nvcc")


def test_a_replica_groups_python_runs_that_interpreter(agent: AgentProcess) -> None:
    """dstack 0.22 ``groups:``: a replica group's own ``python`` (the service sets none) makes
    its replicas' venv with that interpreter; a group without one runs the service's (none)."""
    import socket

    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    # dstack's range (3.9 ..), newest first: the one most likely to make a venv quickly.
    others = [v for v in discover().versions() if v != mine and int(v.split(".")[1]) >= 9]
    if not others:
        pytest.skip(f"this host has no Python 3.9+ other than the agent's own {mine}")
    version = others[-1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = agent.client()
    c.submit(
        f"""
type: service
port: {port}
auth: false
probes: []
replicas:
  - name: py
    count: 1
    python: "{version}"
    commands:
      - python -V
      - echo "venv=$DSTACK_VENV_DIR"
      - exec python -m http.server {port} --bind 127.0.0.1
""",
        name="grp",
    )

    def log() -> str:
        return b"".join(c.logs("grp", job=0)).decode(errors="replace")

    try:
        out = wait_for(lambda: "venv=/" in log() and log(), timeout=60)
        assert f"Python {version}." in out
        assert c.run("grp")["jobs"][0]["status"] == "running"
    finally:
        c.stop("grp", abort=True)
