"""A task runs end to end through real agent processes (fake GPUs), driven by the CLI and API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from meshgpu.client import APIError
from meshgpu.testing import AgentProcess
from tests.agent.conftest import wait_for


def write(dirpath: Path, name: str, text: str) -> Path:
    p = dirpath / name
    p.write_text(text)
    return p


def test_apply_streams_output_and_returns_the_exit_code(
    agent: AgentProcess, tmp_path: Path
) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "data.txt").write_text("payload-from-my-laptop\n")
    (proj / ".gitignore").write_text("secret.bin\n")
    (proj / "secret.bin").write_text("must not be uploaded")
    write(
        proj,
        "task.dstack.yml",
        """
type: task
name: hello
env: [GREETING]
commands:
  - echo "$GREETING rank=$DSTACK_NODE_RANK nodes=$MESHGPU_NODES_NUM gpus=$CUDA_VISIBLE_DEVICES"
  - cat data.txt
  - test ! -e secret.bin && echo ignored-files-stay-home
  - echo args=${{ run.args }}
  - exit 7
resources:
  gpu: H100:2
""",
    )
    os.environ["GREETING"] = "hi"
    try:
        r = agent.cli("apply", "-f", "task.dstack.yml", "-y", "--", "--lr", "0.1", cwd=proj)
    finally:
        del os.environ["GREETING"]
    assert r.returncode == 7, r.stdout + r.stderr
    assert "hi rank=0 nodes=1 gpus=0,1" in r.stdout
    assert "payload-from-my-laptop" in r.stdout and "ignored-files-stay-home" in r.stdout
    assert "args=--lr 0.1" in r.stdout
    ps = agent.cli("ps", "-a", "--json")
    assert '"termination_reason": "job_failed"' in ps.stdout


def test_concurrent_4gpu_tasks_get_disjoint_gpus_and_a_third_waits(
    agent: AgentProcess, tmp_path: Path
) -> None:
    c = agent.client()
    gate = tmp_path / "gate"
    cfg = f"""
type: task
commands:
  - echo "gpus=$CUDA_VISIBLE_DEVICES"
  - while [ ! -e {gate}-$MESHGPU_RUN_NAME ]; do sleep 0.05; done
resources:
  gpu: 4
"""
    for name in ("a", "b", "c"):
        c.submit(cfg, name=name)
    runs = wait_for(
        lambda: (
            (r := {n: c.run(n) for n in "abc"})
            and r["a"]["status"] == r["b"]["status"] == "running"
            and r
        )
    )
    assert runs["c"]["status"] == "submitted"
    assert "largest free: 0" in runs["c"]["jobs"][0]["why_pending"]
    ga, gb = set(runs["a"]["jobs"][0]["gpus"]), set(runs["b"]["jobs"][0]["gpus"])
    # Telemetry follows: the busy fake GPUs show load, the idle ones do not.
    tele = {t["index"]: t for t in c.nodes()[0]["telemetry"]}
    assert all(tele[g]["utilization_pct"] > 50 for g in ga | gb)
    assert all(tele[g]["utilization_pct"] < 5 for g in set(range(8)) - ga - gb)
    assert len(ga) == len(gb) == 4 and not ga & gb
    logs_a = wait_for(lambda: b"".join(c.logs("a")).decode())
    assert logs_a.strip() == "gpus=" + ",".join(str(g) for g in sorted(ga))
    (tmp_path / "gate-a").touch()
    runs = wait_for(lambda: (r := c.run("c")) and r["status"] == "running" and r)
    assert set(runs["jobs"][0]["gpus"]) == ga
    assert c.run("a")["status"] == "done"
    for n in "bc":
        (tmp_path / f"gate-{n}").touch()
    wait_for(lambda: all(c.run(n)["status"] == "done" for n in "bc"))


def test_stop_is_graceful_and_abort_is_not(agent: AgentProcess) -> None:
    c = agent.client()
    cfg = """
type: task
shell: bash
commands:
  - trap 'echo graceful-exit; exit 0' TERM; echo ready; while true; do sleep 0.05; done
"""
    c.submit(cfg, name="polite")
    c.submit(cfg, name="rude")
    for n in ("polite", "rude"):
        wait_for(lambda n=n: b"ready" in b"".join(c.logs(n)))
    r = agent.cli("stop", "polite", "-y")
    assert r.returncode == 0, r.stderr
    r = agent.cli("stop", "rude", "-x", "-y")
    assert r.returncode == 0, r.stderr
    polite = wait_for(lambda: (r := c.run("polite")) and r["status"] == "terminated" and r)
    rude = wait_for(lambda: (r := c.run("rude")) and r["status"] == "terminated" and r)
    assert polite["termination_reason"] == "stopped_by_user"
    assert polite["jobs"][0]["termination_reason"] == "terminated_by_user"
    assert b"graceful-exit" in b"".join(c.logs("polite"))
    assert (
        rude["termination_reason"] == "aborted_by_user" and rude["jobs"][0]["status"] == "aborted"
    )
    assert b"graceful-exit" not in b"".join(c.logs("rude"))


def test_abort_cuts_a_graceful_stop_short(agent: AgentProcess) -> None:
    """A job that ignores SIGTERM, stopped with a long stop_duration, then aborted: the abort
    does not wait out the grace period."""
    c = agent.client()
    cfg = """
type: task
shell: bash
stop_duration: 5m
commands:
  - trap 'echo ignoring-term' TERM; echo ready; while true; do sleep 0.05; done
"""
    c.submit(cfg, name="stubborn")
    wait_for(lambda: b"ready" in b"".join(c.logs("stubborn")))
    c.stop("stubborn")
    wait_for(lambda: b"ignoring-term" in b"".join(c.logs("stubborn")))
    assert c.run("stubborn")["status"] == "terminating"
    t = time.monotonic()
    c.stop("stubborn", abort=True)
    run = wait_for(lambda: (r := c.run("stubborn")) and r["status"] == "terminated" and r)
    assert time.monotonic() - t < 20
    assert run["termination_reason"] == "aborted_by_user"
    # A later graceful stop does not soften the abort.
    c.stop("stubborn")
    assert c.run("stubborn")["termination_reason"] == "aborted_by_user"


def test_max_duration_ends_the_job(agent: AgentProcess) -> None:
    c = agent.client()
    c.submit("type: task\nmax_duration: 1s\nstop_duration: 1s\ncommands: [sleep 60]\n", name="slow")
    run = wait_for(
        lambda: (r := c.run("slow")) and r["status"] in ("failed", "terminated", "done") and r,
        timeout=30,
    )
    assert run["jobs"][0]["termination_reason"] == "max_duration_exceeded"
    assert run["jobs"][0]["finished_at"] - run["jobs"][0]["started_at"] < 10


def test_agent_sigkill_and_restart_readopts_a_running_job(
    agent: AgentProcess, tmp_path: Path
) -> None:
    c = agent.client()
    gate = tmp_path / "release"
    c.submit(
        f"type: task\ncommands:\n  - echo started\n  - while [ ! -e {gate} ]; do sleep 0.05; done\n  - echo finished\n",
        name="survivor",
    )
    wait_for(lambda: c.run("survivor")["status"] == "running")
    agent.kill()
    gate.touch()  # the job finishes while no agent is there
    agent.start()
    c = agent.client()
    run = wait_for(lambda: (r := c.run("survivor")) and r["status"] == "done" and r)
    assert run["jobs"][0]["exit_code"] == 0
    assert b"".join(c.logs("survivor")) == b"started\nfinished\n"
    # And one still running across a restart keeps running, then finishes.
    gate2 = tmp_path / "release2"
    c.submit(
        f"type: task\ncommands:\n  - while [ ! -e {gate2} ]; do sleep 0.05; done\n", name="long"
    )
    wait_for(lambda: c.run("long")["status"] == "running")
    agent.kill()
    agent.start()
    c = agent.client()
    assert c.run("long")["status"] == "running"
    gate2.touch()
    wait_for(lambda: c.run("long")["status"] == "done")


def test_clear_errors(agent: AgentProcess, tmp_path: Path) -> None:
    c = agent.client()
    with pytest.raises(APIError) as e:
        c.submit("type: task\ncomands: [ls]\n", name="bad")
    assert e.value.status == 400 and "did you mean 'commands'" in e.value.detail
    with pytest.raises(APIError) as e:
        c.run("nope")
    assert e.value.status == 404 and "meshgpu ps -a" in e.value.detail
    bad = httpx.get(
        f"{agent.url}/api/v1/runs", headers={"Authorization": "Bearer wrong"}, verify=agent.verify
    )
    assert bad.status_code == 401 and bad.headers["content-type"] == "application/problem+json"
    assert httpx.get(f"{agent.url}/healthz", verify=agent.verify).json()["ok"] is True
    big = tmp_path / "big"
    big.mkdir()
    (big / "blob.bin").write_bytes(
        os.urandom(1_600_000)
    )  # incompressible, over the 1 MiB test limit
    write(big, "t.yml", "type: task\ncommands: [ls]\n")
    r = agent.cli("submit", "-f", "t.yml", cwd=big)
    assert r.returncode == 1 and "too large" in r.stderr and "Traceback" not in r.stderr
    r = agent.cli("apply", "-f", "missing.yml", "-y", cwd=tmp_path)
    assert r.returncode == 1 and "file not found" in r.stderr and "Traceback" not in r.stderr
    up = httpx.post(
        f"{agent.url}/api/v1/code",
        content=b"x" * (3 << 20),
        headers={"Authorization": f"Bearer {agent.token}"},
        verify=agent.verify,
    )
    assert up.status_code == 413
    r = agent.cli("logs", "nope")
    assert r.returncode == 1 and "no run named" in r.stderr
    assert re.search(
        r"\d+",
        httpx.get(
            f"{agent.url}/api/v1/status",
            headers={"Authorization": f"Bearer {agent.token}"},
            verify=agent.verify,
        ).headers["x-meshgpu-applied-index"],
    )


def test_retry_on_error_resubmits_the_job_until_it_succeeds(
    agent: AgentProcess, tmp_path: Path
) -> None:
    c = agent.client()
    marker, gate = tmp_path / "attempted", tmp_path / "gate"
    proj = tmp_path / "proj"
    proj.mkdir()
    write(
        proj,
        "flaky.yml",
        f"""
type: task
name: flaky
retry:
  on_events: [error]
commands:
  - if [ ! -e {marker} ]; then touch {marker}; echo first-attempt; fi
  - if [ ! -e {gate} ]; then while [ ! -e {gate} ]; do sleep 0.05; done; exit 1; fi
  - echo second-attempt
""",
    )
    # apply stays attached across the resubmission: both outputs, then the run's exit status.
    out = tmp_path / "apply.out"
    env = dict(os.environ) | {
        "MESHGPU_URL": agent.url,
        "MESHGPU_TOKEN": agent.token,
        "MESHGPU_CA": str(agent.ca_file),
    }
    with open(out, "wb") as f:
        cli = subprocess.Popen(
            [sys.executable, "-m", "meshgpu", "apply", "-f", "flaky.yml", "-y"],
            cwd=proj,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: b"first-attempt" in out.read_bytes())
            gate.touch()  # the first attempt fails now, while apply streams its output
            assert cli.wait(60) == 0, out.read_text()
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
    text = out.read_text()
    assert "second-attempt" in text and "flaky: retrying (submission 1)" in text, text
    run = c.run("flaky")
    assert run["status"] == "done" and run["termination_reason"] == "all_jobs_done"
    [job] = run["jobs"]
    assert job["submission_num"] == 1 and job["exit_code"] == 0
    assert b"".join(c.logs("flaky")) == b"second-attempt\n"
    ps = agent.cli("ps", "-a", "-v")
    assert "(submission 1)" in ps.stdout


def test_priority_changes_in_place(agent: AgentProcess, tmp_path: Path) -> None:
    c = agent.client()
    gate = tmp_path / "gate"
    proj = tmp_path / "proj"
    proj.mkdir()
    wait = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    c.submit(f"type: task\ncommands: ['{wait}']\nresources:\n  gpu: 8\n", name="hog")
    wait_for(lambda: c.run("hog")["status"] == "running")
    queued = f"type: task\nname: NAME\ncommands: ['{wait}']\nresources:\n  gpu: 8\n"
    for name in ("first", "second"):
        c.submit(queued.replace("NAME", name))
    auth = {"Authorization": f"Bearer {agent.token}"}
    r = httpx.patch(
        f"{agent.url}/api/v1/runs/second", json={"priority": 20}, headers=auth, verify=agent.verify
    )
    assert r.status_code == 200 and r.json()["priority"] == 20
    assert c.run("second")["config"]["priority"] == 20
    bad = httpx.patch(
        f"{agent.url}/api/v1/runs/second", json={"priority": 101}, headers=auth, verify=agent.verify
    )
    assert bad.status_code == 422 and "priority" in bad.json()["detail"]
    assert bad.headers["content-type"] == "application/problem+json"
    with pytest.raises(APIError) as e:
        c.set_priority("nope", 5)
    assert e.value.status == 404
    # apply of the same configuration with only the priority changed updates it in place...
    write(
        proj,
        "first.yml",
        queued.replace("NAME", "first").replace("type: task", "type: task\npriority: 30"),
    )
    r = agent.cli("apply", "-f", "first.yml", "-y", "-d", cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "differs only in priority" in r.stdout and c.run("first")["priority"] == 30
    # ...but any other difference is refused as before.
    write(proj, "other.yml", queued.replace("NAME", "first").replace("gpu: 8", "gpu: 4"))
    r = agent.cli("apply", "-f", "other.yml", "-y", "-d", cwd=proj)
    assert r.returncode == 1 and "is active" in r.stderr, r.stdout + r.stderr
    gate.touch()  # everything finishes; "first" (30) ran before "second" (20)
    done = wait_for(
        lambda: (
            (rs := {n: c.run(n) for n in ("first", "second")})
            and all(x["status"] == "done" for x in rs.values())
            and rs
        )
    )
    assert done["first"]["jobs"][0]["started_at"] <= done["second"]["jobs"][0]["started_at"]


@pytest.mark.slow
def test_a_second_retry_waits_out_its_backoff_then_runs(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """The leader plans again when a backoff ends, with nothing else happening in the mesh."""
    c = agent.client()
    count = tmp_path / "count"
    c.submit(
        f"""
type: task
retry: true
commands:
  - echo x >> {count}
  - test $(wc -l < {count}) -ge 3
""",
        name="twice",
    )
    pending = wait_for(
        lambda: (
            (r := c.run("twice"))
            and r["jobs"][0]["submission_num"] == 2
            and "backing off" in r["jobs"][0]["why_pending"]
            and r
        )
    )
    assert pending["status_message"] == "retrying"
    run = wait_for(lambda: (r := c.run("twice")) and r["status"] in ("done", "failed") and r, 60)
    assert run["status"] == "done" and run["jobs"][0]["submission_num"] == 2
    j = run["jobs"][0]
    assert j["started_at"] - j["submitted_at"] >= 14  # the 15 s backoff of a second retry
