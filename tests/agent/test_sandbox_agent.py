"""The job sandbox through a real agent (root; CI runs it): jobs run as the job user the agent
creates, cannot read the agent's data dir (the CA key, the admin token, the Raft database) nor
signal the agent, and ``ps -v``'s fields (user, limits, working directory) and the node's
``sandbox`` record say so. The user, workspaces and cgroups made are removed at the end."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgpu.cli._runs import sandbox_text
from meshgpu.testing import AgentProcess
from tests.agent.conftest import wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 and os.environ.get("CI") != "true",
    reason="the sandbox needs root (CI runs it as root)",
)
USER = "mgtest-agent"


@pytest.fixture
def root() -> Iterator[Path]:
    # Parents traversable by anyone (pytest's tmp_path is not): only the data dir's own mode
    # keeps the job out of it.
    d = Path(tempfile.mkdtemp(prefix="meshgpu-sbx-", dir="/tmp"))
    os.chmod(d, 0o711)
    try:
        pwd.getpwnam(USER)
        made = False
    except KeyError:
        made = True
    yield d
    shutil.rmtree(d, ignore_errors=True)
    if made:
        subprocess.run(["userdel", USER], check=False, capture_output=True)


def test_jobs_run_sandboxed_as_the_job_user(root: Path) -> None:
    ws = root / "workspaces"
    a = AgentProcess(root, "agent", job_user=USER, workspace_dir=ws)
    try:
        a.start()
        c = a.client()
        data = a.data
        node = c.nodes()[0]
        assert node["sandbox"]["user"] == USER and node["sandbox"]["mount_ns"] is True
        raft = next((data / "raft").iterdir())
        probes = [
            f"cat {data}/tls/* >/dev/null 2>&1 && echo READ-TLS",
            f"cat {data}/admin.token >/dev/null 2>&1 && echo READ-TOKEN",
            f"cat {raft} >/dev/null 2>&1 && echo READ-RAFT",
            f"kill -0 {a.proc.pid} 2>/dev/null && echo SIGNALLED-AGENT",  # type: ignore[union-attr]
            "echo user=$(id -un) pwd=$(pwd)",
            "echo procs=$(ps -e -o comm= | sort | tr '\\n' ,)",
        ]
        # commands are joined with && (dstack): each probe must succeed either way
        cfg = "type: task\ncommands:\n" + "".join(f"  - {p + ' || true'!r}\n" for p in probes)
        cfg += "resources:\n  memory: 2GB..4GB\n  cpu: 1\n"
        c.submit(cfg, name="probe")
        run = wait_for(lambda: (r := c.run("probe"))["status"] in ("done", "failed") and r)
        out = b"".join(c.logs("probe")).decode()
        assert run["status"] == "done", (
            run["jobs"][0]["termination_message"],
            run["jobs"][0]["termination_reason"],
            out,
        )
        job = run["jobs"][0]
        work = a.work_dir(job["job_id"])
        assert "READ-" not in out and "SIGNALLED" not in out, out
        assert f"user={USER}" in out
        if node["sandbox"]["pid_ns"]:  # its own PID namespace: its init, its shell, the pipe
            procs = out.split("procs=", 1)[1].split()[0].strip(",").split(",")
            assert set(procs) <= {"meshgpu-init", "bash", "sh", "ps", "sort", "tr"}, out
            assert "meshgpu-init" in procs, out
        assert f"pwd={work}" in out
        assert job["user"] == USER
        assert job["working_dir"] == str(work)
        if node["sandbox"]["cgroup"]:
            assert job["limits"] == "memory 4GB, cpus 1, pids 32768"
        line = sandbox_text(job)
        assert line.startswith(f"user {USER}; ") and line.endswith(f"in {job['working_dir']}")
    finally:
        a.close()


def test_no_sandbox_runs_jobs_as_the_agent_and_says_so(root: Path) -> None:
    """``meshgpu agent --no-sandbox`` (what ``scripts/bench submit --compare`` measures against):
    no job user even when one is named, no cgroups, no mount namespace; the node record has no
    ``sandbox``, and a job that needs the sandbox (``user:``) fails saying so."""
    a = AgentProcess(root, "agent", job_user=USER, extra=["--no-sandbox"])
    try:
        a.start()
        c = a.client()
        assert c.nodes()[0].get("sandbox") is None
        c.submit("type: task\ncommands: ['echo uid=$(id -u)']\n", name="plain")
        run = wait_for(lambda: (r := c.run("plain"))["status"] in ("done", "failed") and r)
        assert run["status"] == "done"
        assert f"uid={os.geteuid()}" in b"".join(c.logs("plain")).decode()
        assert run["jobs"][0].get("limits") is None
        c.submit("type: task\nuser: nobody\ncommands: ['true']\n", name="other")
        run = wait_for(lambda: (r := c.run("other"))["status"] in ("done", "failed") and r)
        assert run["status"] == "failed"
        assert "sandbox" in run["jobs"][0]["termination_message"]
    finally:
        a.close()
