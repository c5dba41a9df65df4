"""An SSH session into a process job opens where its commands run: its ``working_dir``."""

from __future__ import annotations

import json
from pathlib import Path

from meshgpu.devenv.sshd import load_job_context


def test_a_session_opens_in_the_jobs_working_dir(tmp_path: Path) -> None:
    job = tmp_path / "jobs" / "j1"
    job.mkdir(parents=True)
    wd = tmp_path / "wd"
    record = {"argv": ["/bin/bash", "-c", "x"], "cwd": str(job / "work"), "env": {}}
    (job / "job.json").write_text(json.dumps(record))
    assert load_job_context(tmp_path / "jobs", "j1").cwd == str(job / "work")
    wd.mkdir()
    record["env"] = {"MESHGPU_WORKING_DIR": str(wd)}
    (job / "job.json").write_text(json.dumps(record))
    assert load_job_context(tmp_path / "jobs", "j1").cwd == str(wd)
