"""Finished runs are kept by a policy (count and age): the leader forgets the rest, and each
host deletes the files of the jobs the state no longer knows, so neither the state (and its
snapshots) nor the disk grows without bound. End to end with a short interval (the hidden
``--retention-interval-ms``): when to prune, with the production interval and over days of wall
time, is tested in-process under a fake clock (``tests/ops/test_controllers_clock.py``,
``tests/state/test_retention_policy.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgpu.testing import AgentProcess
from tests.agent.conftest import loopback_agent, running, wait_for


@pytest.fixture
def keeps_two(tmp_path: Path) -> Iterator[AgentProcess]:
    extra = ["--keep-runs", "2", "--retention-interval-ms", "200"]
    yield from running(loopback_agent(tmp_path, "agent", "2xH100:80GB", extra=extra))


def test_finished_runs_beyond_the_policy_are_forgotten_with_their_files(
    keeps_two: AgentProcess,
) -> None:
    c = keeps_two.client()
    names = [c.submit("type: task\ncommands: [echo hi]\n", name=f"r{i}")["name"] for i in range(5)]
    jobs_dir = keeps_two.data / "jobs"

    def settled() -> bool:
        # Every run finished (a pruned one did), and the leader, which looks every 200 ms
        # here, pruned what the policy forgets: past 2 + 1 (one run per 10 % of the count)
        # it keeps the 2 that finished last. Runs finishing between two looks may leave 3.
        runs = c.runs(all=True)
        return all(r["status"] == "done" for r in runs) and 2 <= len(runs) <= 3

    wait_for(settled, timeout=60)
    runs = c.runs(all=True)
    assert {r["name"] for r in runs} <= set(names)
    kept = {r["jobs"][0]["job_id"] for r in runs}  # each host deletes the others' files
    wait_for(lambda: {d.name for d in jobs_dir.iterdir() if d.is_dir()} == kept, timeout=20)
    assert b"hi" in b"".join(c.logs(runs[0]["name"]))


def test_a_bad_retention_value_is_refused(tmp_path: Path) -> None:
    a = loopback_agent(tmp_path, "agent", "1xH100:80GB", extra=["--keep-runs-for", "soon"])
    with pytest.raises(RuntimeError, match="keep-runs-for"):
        a.start()
