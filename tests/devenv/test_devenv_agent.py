"""Dev environments and auto-stop on a real agent: ``type: dev-environment`` runs ``init`` and
stays up; ``inactivity_duration: 30s`` stops an unattended one within the next check after
30 s (the monitor wakes at the deadline itself), not one with an open session; a
utilization policy stops a job whose fake GPUs report 0 % for the window, not one at 90 %."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from meshgpu.agent import Agent
from meshgpu.client import Client
from meshgpu.client.http import Profile
from meshgpu.settings import AgentSettings
from meshgpu.testing import AgentProcess

CHECK_S = 5.0  # the agent's default --autostop-interval-ms, in seconds


def wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def job_of(ag: AgentProcess, name: str) -> dict[str, Any]:
    return ag.client().run(name)["jobs"][0]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    ag = AgentProcess(
        tmp_path,
        "agent",
        fake_gpus="2xH100:80GB",
        # a 5m utilization window lasts 6 s here (dstack's minimum window is five minutes)
        extra=["--utilization-window-scale", "0.02"],
    )
    try:
        yield ag.start()
    finally:
        ag.close()


def test_unattended_dev_environment_stops_after_inactivity_duration(
    agent: AgentProcess, tmp_path: Path
) -> None:
    work = tmp_path / "proj"
    work.mkdir()
    (work / "dev.yml").write_text(
        "type: dev-environment\n"
        "name: dev\n"
        "ide: vscode\n"
        "init:\n  - echo init ran > init.txt\n"
        "inactivity_duration: 30s\n"
    )
    res = agent.cli("apply", "-f", "dev.yml", "-y", "-d", cwd=work)
    assert res.returncode == 0, res.stderr + res.stdout
    assert "inactivity duration" in res.stdout and "30s" in res.stdout
    job = wait_for(lambda: (j := job_of(agent, "dev"))["status"] == "running" and j, 30)
    # init ran in the job's working directory, and the job stays up after it
    assert job["working_dir"] and job["working_dir"].endswith("/work")
    wait_for(lambda: Path(job["working_dir"], "init.txt").exists(), 10)
    assert b"is ready" in b"".join(agent.client().logs("dev"))
    time.sleep(2)
    ps = agent.cli("ps", "-v")
    assert "idle" in ps.stdout and "of 30s" in ps.stdout, ps.stdout
    run = agent.client().run("dev")
    assert run["dev_environment"] == {"ide": "vscode", "inactivity_duration": 30}
    assert run["jobs"][0]["inactivity_secs"] >= 1
    # ended within the next check after 30 s of no session
    done = wait_for(
        lambda: (j := job_of(agent, "dev"))["status"] not in ("running", "terminating") and j,
        30 + CHECK_S + 20,
    )
    assert done["termination_reason"] == "inactivity_duration_exceeded", done
    assert done["status"] == "terminated"
    took = done["finished_at"] - done["started_at"]
    assert 30 <= took <= 30 + CHECK_S + 3, took
    assert "no SSH session" in done["termination_message"]
    # The run ends as the state machine ends a run after a job's non-retried end (as for
    # max_duration_exceeded): failed, job_failed; the job's own reason says why.
    assert agent.client().run("dev")["status"] in ("failed", "terminated")


def test_utilization_policy_stops_the_idle_gpu_job_not_the_busy_one(
    agent: AgentProcess, tmp_path: Path
) -> None:
    c = agent.client()
    task = (
        "type: task\nname: {name}\ncommands: [sleep 600]\nresources: {{gpu: 1}}\n"
        "utilization_policy:\n  min_gpu_utilization: 10\n  time_window: 5m\n"
    )
    for name in ("idle", "busy"):
        c.submit(task.format(name=name))
    jobs = {
        n: wait_for(lambda n=n: (j := job_of(agent, n))["status"] == "running" and j, 30)
        for n in ("idle", "busy")
    }
    # The fake GPUs' utilization, as a test sets it: <data>/fake-gpu-state.json
    state = {str(jobs["idle"]["gpus"][0]): {"utilization_pct": 0.0}}
    state[str(jobs["busy"]["gpus"][0])] = {"utilization_pct": 90.0}
    (agent.data / "fake-gpu-state.json").write_text(json.dumps(state))
    set_at = time.time()
    # The window (6 s here) must hold nothing but 0 % samples: a few samples after the change
    done = wait_for(
        lambda: (j := job_of(agent, "idle"))["status"] == "terminated" and j, 6 + CHECK_S + 15
    )
    assert done["termination_reason"] == "terminated_due_to_utilization_policy", done
    assert "below 10%" in done["termination_message"]
    # not before a window of low samples: 6 s less dstack's data slack (a minute, scaled: 1.2 s)
    assert done["finished_at"] - set_at >= 6 - 1.2 - 0.1
    time.sleep(4)
    assert job_of(agent, "busy")["status"] == "running"
    c.stop("busy", abort=True)


async def test_open_session_keeps_a_dev_environment_and_reapply_changes_the_limit(
    tmp_path: Path,
) -> None:
    """The agent in this process, so the test opens and closes sessions on its one
    SessionTracker (``Agent.sessions``) as the SSH server does."""
    settings = AgentSettings(
        data_dir=tmp_path / "agent",
        name="agent",
        api_port=0,
        peer_port=0,
        fake_gpus="1xH100:80GB",
        mdns=False,
        autostop_interval_s=1.0,
    )
    ag = Agent(settings)
    dev = "type: dev-environment\nname: {name}\ninactivity_duration: {d}\n"
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(ag.run)
            ca = (settings.data_dir / "tls" / "ca.crt").read_text()
            c = Client(Profile(url, ag.identity.admin_token, ca=ca), timeout=30)

            async def call(fn: Any, *a: Any, **kw: Any) -> Any:
                return await trio.to_thread.run_sync(lambda: fn(*a, **kw))

            async def job(name: str) -> dict[str, Any]:
                return (await call(c.run, name))["jobs"][0]

            async def until(name: str, pred: Any, timeout: float) -> dict[str, Any]:
                with trio.fail_after(timeout):
                    while not pred(j := await job(name)):
                        await trio.sleep(0.2)
                return j

            await call(c.submit, dev.format(name="alone", d="6s"))
            await call(c.submit, dev.format(name="used", d="6s"))
            used = await until("used", lambda j: j["status"] == "running", 30)
            ag.sessions.opened(used["job_id"])  # as the SSH server does for `ssh used`
            alone = await until("alone", lambda j: j["status"] == "terminated", 30)
            assert alone["termination_reason"] == "inactivity_duration_exceeded"
            # attached: published for ps -v, and not stopped however long it lasts
            j = await until("used", lambda j: j["sessions"] == 1, 10)
            assert j["inactivity_secs"] is None
            await trio.sleep(8)
            assert (await job("used"))["status"] == "running"
            # re-apply with a longer limit: changed in place, the same run
            body = {
                "config": dev.format(name="used", d="1h"),
                "name": "used",
                "request_id": "again-0001",
                "in_place": True,
            }
            doc = (await call(c._request, "POST", "/api/v1/runs", json=body)).json()
            assert doc["updated_in_place"] == ["inactivity_duration"]
            assert doc["jobs"][0]["job_id"] == used["job_id"]
            ag.sessions.closed(used["job_id"])
            j = await until("used", lambda j: j["sessions"] == 0, 10)
            assert j["inactive_since"] is not None
            await trio.sleep(8)  # past the old 6 s: the new limit holds
            assert (await job("used"))["status"] == "running"
            # and back to 3 s: stopped about 3 s after the session closed
            body["config"] = dev.format(name="used", d="3s")
            body["request_id"] = "again-0002"
            await call(c._request, "POST", "/api/v1/runs", json=body)
            done = await until("used", lambda j: j["status"] == "terminated", 10)
            assert done["termination_reason"] == "inactivity_duration_exceeded"
            c.close()
            nursery.cancel_scope.cancel()
    finally:
        await ag.aclose()
        from meshgpu.testing import kill_job_processes

        kill_job_processes(settings.data_dir)


def test_apply_waits_prints_the_ide_link_and_attaches(agent: AgentProcess, tmp_path: Path) -> None:
    """``apply`` of a dev environment (no -d): waits until it runs, prints the IDE link at the
    job's working directory and ``ssh RUN``, then attaches (``meshgpu attach`` when the build
    has it, else it follows the output, as here on a branch without it)."""
    import subprocess
    import sys

    work = tmp_path / "proj"
    work.mkdir()
    (work / "dev.yml").write_text(
        "type: dev-environment\nname: ide\nide: cursor\ninit: [echo hi]\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshgpu", "apply", "-f", "dev.yml", "-y"],
        cwd=work,
        env=agent.cli_env() | {"COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "is ready" in line:  # the job's own output: attached, following its logs
                break
        text = "".join(seen)
        job = job_of(agent, "ide")
        assert f"cursor://vscode-remote/ssh-remote+ide{job['working_dir']}" in text, text
        assert "ssh ide" in text
        assert job["status"] == "running"
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        agent.client().stop("ide", abort=True)
