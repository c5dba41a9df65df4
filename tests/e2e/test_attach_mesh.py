"""Attach through any node: two agents in their own network namespaces, the client (this
process, in the root namespace) can reach only the node that does NOT run the job. After
``meshgpu attach``, the real OpenSSH client runs commands inside the job (its run name, its
working directory), copies a file in and back byte-identical with scp, reaches an HTTP server on
the job's port with ``ssh -L``, lists the working directory with sftp; a key that was never
registered is refused; an open session keeps a dev environment with ``inactivity_duration``
running past its limit."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgpu.testing import AgentProcess
from tests.e2e.agents import ns_agent, wait_for
from tests.e2e.netns import Net, available

REASON = available() or ("" if shutil.which("ssh") else "the OpenSSH client is not installed")
if REASON and os.environ.get("CI") == "true":
    raise RuntimeError(f"under CI these tests must run: {REASON}")
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON or "ok")

DEV = """\
type: dev-environment
name: box
ide: vscode
inactivity_duration: 20s
ports: [8080]
init:
  - echo hello-from-the-job > marker.txt
  - python3 -m http.server 8080 --bind 0.0.0.0 &
resources:
  gpu: H100:1
  cpu: 1..
  memory: 0.1GB..
  disk: 1GB..
"""


def _block_root(net: Net, ns: str) -> None:
    """This process (the root namespace, through the bridge's address) cannot reach ``ns``."""
    bridge_ip = net.hosts[0].ip.rsplit(".", 1)[0] + ".254"
    rules = (
        "table inet mgclient {\n"
        "  chain input { type filter hook input priority 0; policy accept;"
        f" ip saddr {bridge_ip} drop; }}\n"
        "}\n"
    )
    subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"],
        input=rules,
        text=True,
        check=True,
        capture_output=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Net, list[AgentProcess]]]:
    root = tmp_path_factory.mktemp("attach")
    net = Net.create(2)
    agents: list[AgentProcess] = []
    try:
        # only h2 has an H100: the dev environment runs there
        for i, (h, gpus) in enumerate(
            zip(net.hosts, ["1xA100:40GB", "1xH100:80GB"], strict=True), start=1
        ):
            agents.append(ns_agent(h, root, f"h{i}", fake_gpus=gpus))
            agents[-1].start(agents[0].join_token() if i > 1 else None)
        wait_for(lambda: len(agents[0].client().nodes()) == 2, timeout=60)
        yield net, agents
    finally:
        for a in agents:
            a.close()
        net.delete()


def _env(agent: AgentProcess, home: Path) -> dict[str, str]:
    return agent.cli_env() | {"HOME": str(home)}


def _ssh(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # OpenSSH reads ~/.ssh/config from the passwd entry's home, not $HOME: name the file
    config = str(Path(env["HOME"]) / ".ssh" / "config")
    return subprocess.run(
        ["ssh", "-F", config, "-o", "BatchMode=yes", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_attach_through_the_node_that_does_not_run_the_job(
    world: tuple[Net, list[AgentProcess]], tmp_path: Path
) -> None:
    net, (h1, h2) = world
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "dev.yml").write_text(DEV)
    home = tmp_path / "home"
    home.mkdir()
    env = _env(h1, home)
    r = h1.cli("apply", "-f", "dev.yml", "-y", "-d", cwd=proj, env={"HOME": str(home)})
    assert r.returncode == 0, r.stdout + r.stderr
    c = h1.client()
    run = wait_for(lambda: (x := c.run("box")) and x["status"] == "running" and x, timeout=60)
    assert run["jobs"][0]["node"] == "h2", run
    workdir = run["jobs"][0]["working_dir"]
    _block_root(net, h2.netns)  # from here on, only h1 is reachable from this process
    with pytest.raises(OSError):
        socket.create_connection((net.hosts[1].ip, 7480), timeout=2).close()

    r = h1.cli("attach", "box", "--config-only", env={"HOME": str(home)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (home / ".ssh" / "config").read_text().startswith("Include")

    # the job's run name and working directory
    r = _ssh(env, "box", "echo $MESHGPU_RUN_NAME; pwd; cat marker.txt")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["box", workdir, "hello-from-the-job"], r.stdout

    # scp in and back, byte-identical
    blob = os.urandom(3 << 20)
    (tmp_path / "in.bin").write_bytes(blob)
    base = ["-F", str(home / ".ssh" / "config"), "-o", "BatchMode=yes"]
    for args in (
        [str(tmp_path / "in.bin"), "box:copied.bin"],
        ["box:copied.bin", str(tmp_path / "back.bin")],
    ):
        r = subprocess.run(
            ["scp", *base, *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "back.bin").read_bytes() == blob

    # sftp lists the working directory
    r = subprocess.run(
        ["sftp", *base, "-b", "-", "box"],
        input="ls\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "marker.txt" in r.stdout and "copied.bin" in r.stdout, r

    # ssh -L to the HTTP server on the job's port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    fwd = subprocess.Popen(
        ["ssh", *base, "-N", "-L", f"{local}:127.0.0.1:8080", "box"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        body = wait_for(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{local}/marker.txt", timeout=5)
                .read()
                .decode()
            ),
            timeout=30,
            interval=0.3,
        )
        assert body.strip() == "hello-from-the-job"
        # an open session keeps the dev environment past inactivity_duration (20 s)
        time.sleep(25)
        assert c.run("box")["status"] == "running"
    finally:
        fwd.terminate()
        fwd.wait(timeout=10)

    # a key that was never registered is refused
    other = tmp_path / "other_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True, timeout=30
    )
    # the same configuration, but with that key in place of the registered one
    stranger = tmp_path / "stranger"
    (stranger / ".ssh").mkdir(parents=True)
    lines = (home / ".meshgpu" / "ssh" / "config").read_text().splitlines()
    (stranger / ".ssh" / "config").write_text(
        "\n".join(
            f"    IdentityFile {other}" if ln.strip().startswith("IdentityFile") else ln
            for ln in lines
        )
        + "\n"
    )
    r = _ssh(env | {"HOME": str(stranger)}, "box", "true")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr

    # unattended now: stopped for inactivity within a check interval after 20 s
    ended = wait_for(
        lambda: (x := c.run("box")) and x["jobs"][0]["status"] == "terminated" and x,
        timeout=60,
        interval=0.5,
    )
    assert ended["jobs"][0]["termination_reason"] == "inactivity_duration_exceeded", ended
    # a tunnel to a job that ended: a clean error, not a hang
    r = _ssh(env, "box", "true", timeout=30)
    assert r.returncode != 0
