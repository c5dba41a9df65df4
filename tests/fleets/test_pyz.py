"""The agent as one file: scripts/build's zipapp runs ``meshgpu`` with the system Python and
nothing else (no venv, no PYTHONPATH), says which version and Python it was built for, and the
version is pyproject.toml's."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

import meshgpu
from meshgpu.fleets import pyz

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")
REASON = "" if SYSTEM_PYTHON else "no system python3 in /usr/bin"
if REASON and os.environ.get("CI") == "true":
    raise RuntimeError(f"under CI these tests must run: {REASON}")


def test_version_is_pyprojects() -> None:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert doc["project"]["version"] == meshgpu.__version__


@pytest.mark.skipif(bool(REASON), reason=REASON or "ok")
def test_the_file_runs_with_the_system_python(tmp_path: Path) -> None:
    out = pyz.build(tmp_path / "meshgpu.pyz")
    assert pyz.file_info(out) == {"version": meshgpu.__version__, "python": pyz.python_tag()}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHIV_ROOT": str(tmp_path / "shiv")}
    r = subprocess.run(
        [str(SYSTEM_PYTHON), str(out), "version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == meshgpu.__version__
    r = subprocess.run(
        [str(SYSTEM_PYTHON), str(out), "agent", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert r.returncode == 0 and "--token" in r.stdout, r.stderr


def test_agent_file_prefers_the_named_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "given.pyz"
    f.write_bytes(b"x")
    monkeypatch.setenv("MESHGPU_AGENT_PYZ", str(f))
    assert pyz.agent_file(tmp_path / "cache") == f
    monkeypatch.setenv("MESHGPU_AGENT_PYZ", str(tmp_path / "missing.pyz"))
    with pytest.raises(pyz.BuildError):
        pyz.agent_file(tmp_path / "cache")
