"""The SSH server of a real agent process: keys registered through the API, the host key in
the node record, sessions inside a running job, and the end of the job ending them."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgpu.client.http import APIError, Client
from meshgpu.testing import AgentProcess
from tests.devenv._sshd import keygen, needs_openssh

pytestmark = needs_openssh


def wait_for(predicate, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)
    return value


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    a = AgentProcess(tmp_path, "a", fake_gpus="1xH100:80GB")
    try:
        yield a.start()
    finally:
        a.close()


def ssh(
    a: AgentProcess, tmp: Path, key: Path, user: str, *cmd: str
) -> subprocess.CompletedProcess[str]:
    node = a.client().nodes()[0]
    host, port = node["ssh_address"].rsplit(":", 1)
    known = tmp / "known_hosts"
    known.write_text(f"[{host}]:{port} {node['ssh_host_key']}\n")
    argv = [
        "ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-p", port, f"{user}@{host}", *cmd,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def add_key(c: Client, public_key: str, name: str = "") -> dict:
    return c._request(
        "POST", "/api/v1/ssh/keys", json={"public_key": public_key, "name": name}
    ).json()


def test_keys_api_and_a_session_in_a_job(agent: AgentProcess, tmp_path: Path) -> None:
    c = agent.client()
    # The node registered its SSH server: address and host key, the key kept across restarts.
    node = c.nodes()[0]
    assert node["ssh_address"].endswith(f":{agent.ssh_port}")
    assert node["ssh_host_key"].startswith("ssh-ed25519 ")
    host_key = agent.data / "ssh_host_ed25519_key"
    assert host_key.stat().st_mode & 0o777 == 0o600

    # Malformed keys: 400 with the reason.
    for bad, why in [
        ("ssh-ed25519 !!!notbase64", "base64"),
        ("ssh-dss AAAAB3NzaC1kc3M=", "not accepted"),
        ("ssh-ed25519 AAAAC3NzaC1yc2E=", "not a ssh-ed25519 key"),
        ("", "empty"),
    ]:
        with pytest.raises(APIError) as e:
            add_key(c, bad)
        assert e.value.status == 400 and why in e.value.detail, (bad, e.value)

    key = tmp_path / "id_ed25519"
    pub = keygen(key)
    added = add_key(c, pub, "laptop")
    fp = subprocess.run(
        ["ssh-keygen", "-lf", str(key)], capture_output=True, text=True
    ).stdout.split()[1]
    assert added["fingerprint"] == fp and added["name"] == "laptop"
    assert add_key(c, pub)["fingerprint"] == fp  # again: no error, same key
    listed = c._request("GET", "/api/v1/ssh/keys").json()
    assert [k["fingerprint"] for k in listed] == [fp]

    c.submit("type: task\nname: dev\ncommands: ['sleep infinity']\n")
    wait_for(lambda: c.run("dev")["status"] == "running")
    r = ssh(agent, tmp_path, key, "dev", "echo $MESHGPU_RUN_NAME; pwd")
    assert r.returncode == 0, r.stderr
    name, cwd = r.stdout.split()
    job_id = c.run("dev")["jobs"][0]["job_id"]
    assert name == "dev" and cwd == str(agent.work_dir(job_id))

    # A key never registered is refused.
    other = tmp_path / "other"
    keygen(other)
    r = ssh(agent, tmp_path, other, "dev", "true")
    assert r.returncode == 255 and "Permission denied" in r.stderr

    # Removed: refused too.
    c._request("DELETE", f"/api/v1/ssh/keys/{fp}")
    with pytest.raises(APIError) as e:
        c._request("DELETE", f"/api/v1/ssh/keys/{fp}")
    assert e.value.status == 404
    r = ssh(agent, tmp_path, key, "dev", "true")
    assert r.returncode == 255 and "Permission denied" in r.stderr

    # The job ends: sessions are refused with the reason.
    add_key(c, pub)
    c.stop("dev")
    wait_for(lambda: c.run("dev")["status"] in ("terminated", "done", "aborted", "failed"))
    r = ssh(agent, tmp_path, key, "dev", "true")
    assert r.returncode == 255 and "has ended" in r.stderr, r.stderr
