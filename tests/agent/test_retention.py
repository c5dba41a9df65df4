"""Finished runs are kept by a policy (count and age): the leader forgets the rest, and each
host deletes the files of the jobs the state no longer knows, so neither the state (and its
snapshots) nor the disk grows without bound."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgpu.testing import AgentProcess
from tests.agent.conftest import loopback_agent, running, wait_for


@pytest.fixture
def keeps_two(tmp_path: Path) -> Iterator[AgentProcess]:
    yield from running(loopback_agent(tmp_path, "agent", "2xH100:80GB", extra=["--keep-runs", "2"]))


def test_finished_runs_beyond_the_policy_are_forgotten_with_their_files(
    keeps_two: AgentProcess,
) -> None:
    c = keeps_two.client()
    names = [c.submit("type: task\ncommands: [echo hi]\n", name=f"r{i}")["name"] for i in range(5)]
    wait_for(lambda: all(c.run(n)["status"] == "done" for n in names), timeout=60)
    jobs_dir = keeps_two.data / "jobs"
    # The two that finished last stay; the rest go from the state, then from the disk (the
    # leader looks every 10 s).
    wait_for(lambda: len(c.runs(all=True)) == 2, timeout=40)
    runs = c.runs(all=True)
    assert {r["name"] for r in runs} <= set(names)
    kept = {r["jobs"][0]["job_id"] for r in runs}
    wait_for(lambda: {d.name for d in jobs_dir.iterdir() if d.is_dir()} == kept, timeout=40)
    assert b"hi" in b"".join(c.logs(runs[0]["name"]))


def test_a_bad_retention_value_is_refused(tmp_path: Path) -> None:
    a = loopback_agent(tmp_path, "agent", "1xH100:80GB", extra=["--keep-runs-for", "soon"])
    with pytest.raises(RuntimeError, match="keep-runs-for"):
        a.start()
