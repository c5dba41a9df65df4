"""The agent's data dir is private to the user running it: directories 0700, files 0600 (the Raft
log holds every submitted config; ``tls/`` the node's key; the jobs' logs their output). Modes
are set at creation, not through the umask (jobs inherit it), so an agent started with the usual
umask 022 leaves nothing readable to others; an existing dir left looser is tightened at startup,
with a warning; another local user trying to read the log, the node identity or the TLS key is
refused."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from consensus.core.types import Snapshot, SnapshotMetadata
from consensus.storage import DiskStorage
from consensus.storage._snapshot import write_snapshot
from meshgpu.datadir import DataDirError, secure_data_dir
from meshgpu.testing import AgentProcess
from tests.agent.conftest import loopback_agent

TASK = """
type: task
commands:
  - cat data.txt
  - echo written-by-the-job > made.txt && cat made.txt
"""


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def loose(root: Path) -> list[str]:
    """Entries of ``root`` (itself included) with group or other bits, outside the contents of
    job working directories (the job's own files, created with its umask)."""
    bad = []
    for top, dirs, files in os.walk(root):
        rel = Path(top).relative_to(root).parts
        if len(rel) == 3 and rel[0] == "jobs" and rel[2] == "work":
            dirs[:] = []
            files = []
        for name in [*dirs, *files, *([""] if not rel else [])]:
            p = Path(top) / name
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
                bad.append(f"{p.relative_to(root)} {stat.S_IMODE(st.st_mode):04o}")
    return bad


def start(data_dir: Path) -> AgentProcess:
    return loopback_agent(data_dir.parent, data_dir.name, "1xH100:80GB").start()


def test_an_agent_started_with_umask_022_keeps_everything_private(
    tmp_path: Path, umask022: None
) -> None:
    data = tmp_path / "agent"  # created by the agent
    ag = start(data)
    try:
        proj = tmp_path / "proj"
        proj.mkdir()
        (proj / "data.txt").write_text("uploaded-code\n")
        (proj / "task.yml").write_text(TASK)
        r = ag.cli("apply", "-f", "task.yml", "-y", cwd=proj)
        # The job reads its code and writes in its working directory as before.
        assert r.returncode == 0, r.stdout + r.stderr
        assert "uploaded-code" in r.stdout and "written-by-the-job" in r.stdout
        # While it runs (SQLite's -wal and -shm files exist only while the log is open).
        for must in ("raft/raft.db", "raft/raft.db-wal", "raft/raft.db-shm", "node.json"):
            assert (data / must).exists(), must
        for must in ("tls/node.key", "tls/ca.crt", "client.toml", "join-token.json"):
            assert (data / must).exists(), must
        assert list((data / "code").iterdir()) and list((data / "jobs").iterdir())
        assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
        assert loose(data) == []
    finally:
        ag.close()
    assert loose(data) == []


def test_a_loose_data_dir_is_tightened_at_startup_with_a_warning(
    tmp_path: Path, umask022: None
) -> None:
    data = tmp_path / "agent"
    (data / "jobs" / "old" / "work").mkdir(parents=True)
    (data / "notes").mkdir()
    for p in (data, data / "jobs", data / "jobs" / "old", data / "notes"):
        p.chmod(0o755)
    (data / "fake-gpu-state.json").write_text("{}")
    (data / "notes" / "n.txt").write_text("x")
    (data / "jobs" / "old" / "output.log").write_text("old output")
    (data / "jobs" / "old" / "work" / "result.csv").write_text("the job's own file")
    for p in (data / "fake-gpu-state.json", data / "jobs" / "old" / "output.log"):
        p.chmod(0o644)
    ag = start(data)
    ag.close()
    assert loose(data) == []
    assert stat.S_IMODE(os.stat(data / "fake-gpu-state.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data / "notes").st_mode) == 0o700
    # A job's own files are its business (the directories above them are private).
    assert stat.S_IMODE(os.stat(data / "jobs/old/work/result.csv").st_mode) == 0o644
    log = (tmp_path / "agent.log").read_text()
    assert f"{data} was readable by other users (mode 0755)" in log
    assert f"{data / 'fake-gpu-state.json'} was readable by other users (mode 0644)" in log


def test_secure_data_dir_tightens_and_reports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f").write_text("x")
    d.chmod(0o755)
    (d / "sub").chmod(0o750)
    (d / "sub" / "f").chmod(0o664)
    (d / "link").symlink_to("/etc/hostname")
    with caplog.at_level(logging.WARNING, logger="meshgpu.datadir"):
        got = secure_data_dir(d)
    assert sorted((p.name, m) for p, m in got) == [("d", 0o755), ("f", 0o664), ("sub", 0o750)]
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in (d, d / "sub", d / "sub" / "f")] == [
        0o700,
        0o700,
        0o600,
    ]
    assert f"{d / 'sub' / 'f'} was readable by other users (mode 0664)" in caplog.text
    assert secure_data_dir(d) == []  # nothing left to do, nothing logged
    (tmp_path / "via").symlink_to(d)  # a data dir reached through a link is walked as well
    (d / "sub" / "g").write_text("y")
    (d / "sub" / "g").chmod(0o640)
    assert [p.name for p, _ in secure_data_dir(tmp_path / "via")] == ["g"]


def test_raft_storage_and_snapshots_are_private(tmp_path: Path, umask022: None) -> None:
    s = DiskStorage(tmp_path / "raft")
    try:
        write_snapshot(tmp_path / "raft", Snapshot(SnapshotMetadata(5, 1), b"state"))
        modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in (tmp_path / "raft").iterdir()}
    finally:
        s.close()
    assert {"raft.db", "raft.db-wal", "raft.db-shm"} <= set(modes)
    assert stat.S_IMODE(os.stat(tmp_path / "raft").st_mode) == 0o700
    assert set(modes.values()) == {0o600}, modes


def _root_or_ci() -> None:
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("needs root (to act as another user); always runs in CI")


def test_a_data_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    _root_or_ci()
    import pwd

    nobody = pwd.getpwnam("nobody")
    d = tmp_path / "d"
    d.mkdir()
    (d / "planted").write_text("x")
    os.chown(d / "planted", nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(DataDirError, match="planted belongs to uid"):
        secure_data_dir(d)


_READER = """
import json, sys
out = {}
for p in sys.argv[1:]:
    try:
        open(p, "rb").read(1)
        out[p] = "read"
    except PermissionError:
        out[p] = "denied"
    except OSError as e:
        out[p] = type(e).__name__
print(json.dumps(out))
"""


def test_another_local_user_cannot_read_the_raft_log_identity_or_tls_key(umask022: None) -> None:
    _root_or_ci()
    import pwd

    nobody = pwd.getpwnam("nobody")
    # Beside the world, not under pytest's private tmp dir: only the data dir's own modes may
    # keep the reader out.
    base = Path(tempfile.mkdtemp(prefix="meshgpu-datadir-"))
    try:
        base.chmod(0o755)
        control = base / "control.txt"
        control.write_text("anyone may read this")
        control.chmod(0o644)
        data = base / "agent"
        ag = start(data)
        ag.close()
        secrets = [data / "raft" / "raft.db", data / "node.json", data / "tls" / "node.key"]
        assert all(p.exists() for p in secrets)
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        r = subprocess.run(
            [python, "-I", "-S", "-c", _READER, str(control), *map(str, secrets)],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got.pop(str(control)) == "read"  # the reader itself works
        assert got == {str(p): "denied" for p in secrets}
    finally:
        shutil.rmtree(base, ignore_errors=True)
