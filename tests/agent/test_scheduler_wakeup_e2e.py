"""A queued job starts as soon as the runs ahead of it are stopped, with no other submission to
wake the scheduler (a real agent with fake GPUs)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgpu.testing import AgentProcess
from tests.agent.conftest import loopback_agent, running, wait_for

# A job that shrugs off SIGTERM: stopped, it holds its GPUs for the whole stop_duration. (A task:
# two replicas of a process service could not share the host -- they would need one port.)
STUBBORN = """
type: task
stop_duration: 120
shell: bash
commands:
  - trap '' TERM; echo ready; while true; do sleep 0.05; done
resources:
  gpu: GPUS
"""


@pytest.fixture
def agent4(tmp_path: Path) -> Iterator[AgentProcess]:
    yield from running(loopback_agent(tmp_path, "agent", "4xH100:80GB"))


def test_a_task_behind_two_stopped_runs_starts_at_once(agent4: AgentProcess) -> None:
    c = agent4.client()
    # g1: one job on GPUs 0-1. g2: a 3-GPU job, waiting; it holds the host for itself, so the
    # 1-GPU task behind it waits although two GPUs are free.
    c.submit(STUBBORN.replace("GPUS", "2"), name="g1")
    wait_for(lambda: c.run("g1")["status"] == "running")
    c.submit(STUBBORN.replace("GPUS", "3"), name="g2")
    c.submit("type: task\ncommands: ['sleep 600']\nresources:\n  gpu: 1\n", name="t")
    job = wait_for(lambda: (j := c.run("t")["jobs"][0]) and j["why_pending"] and j)
    assert job["status"] == "submitted"
    assert "ahead in the queue" in job["why_pending"]
    assert all(j["status"] == "submitted" for j in c.run("g2")["jobs"])
    # Stop both. g1 is still stopping (it ignores SIGTERM) when the task should start: the
    # stop of g2 alone frees the host's spare GPUs for it; nothing else is submitted.
    c.stop("g1")
    c.stop("g2")
    stopped = time.monotonic()
    run = wait_for(lambda: (r := c.run("t")) and r["status"] == "running" and r, timeout=10)
    assert time.monotonic() - stopped < 10
    assert run["jobs"][0]["gpus"] and set(run["jobs"][0]["gpus"]) <= {2, 3}
    assert c.run("g1")["status"] == "terminating"
    assert c.run("g2")["status"] == "terminated"
    # g1's processes are killed with the agent's jobs when the fixture closes.
