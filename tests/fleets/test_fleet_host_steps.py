"""What the fleet controller sends to a host, with a fake SSH connection (no systemd runs here:
the background-process path runs for real in tests/e2e/test_ssh_fleet.py): each fleet has its
own systemd unit ``meshgpu-agent-<fleet>.service`` and its own install directory, so two fleets
on one host do not touch each other's agent; the fleet's env reaches the host (unsealed by the
leader) and never sits in the replicated state in plaintext; a host taken out leaves the node
list; the scripts are valid ``sh``."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshgpu.fleets import ssh
from meshgpu.state.cluster import Replicated, encode_cluster
from meshgpu.state.codec import encode
from meshgpu.state.commands import RegisterNode
from meshgpu.state.machine import Result

SECRET_ENV = "hf_sealed-value-31337"


def _facts(home: str, systemd: bool, running: bool = False) -> str:
    lines = [
        f"home={home}",
        "python=/usr/bin/python3",
        "pyver=3.11",
        "free_kb=10485760",
        "uid=0",
        "addr=10.0.0.1/24",
    ]
    if systemd:
        lines.append("systemd=1")
    if running:
        lines.append("running=1")
    return "\n".join(lines) + "\n"


class FakeResult:
    def __init__(self, stdout: str, exit_status: int = 0) -> None:
        self.stdout, self.stderr, self.exit_status = stdout, "", exit_status


class FakeConn:
    """Answers the facts script like a root host with systemd; records every other script."""

    def __init__(self, base: str, systemd: bool) -> None:
        self.base, self.systemd = base, systemd
        self.scripts: list[str] = []
        self.closed = False

    async def run(self, cmd: str, input: str = "", check: bool = False) -> FakeResult:  # noqa: A002
        assert cmd == "sh -s"
        self.scripts.append(input)
        if 'echo "home=$D"' in input:
            fleet = input.split('D="$B"/', 1)[1].split("\n", 1)[0]
            return FakeResult(_facts(f"{self.base}/{fleet}", self.systemd))
        return FakeResult("")

    def close(self) -> None:
        self.closed = True


def _pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture
def mesh(tmp_path: Path) -> dict[str, Any]:
    from meshgpu.security import NodeIdentity, create_cluster

    ident = NodeIdentity(tmp_path / "tls")
    assert create_cluster(ident, 1, hosts=("127.0.0.1",)) is not None
    rep = Replicated()
    rep.cluster.ca_cert_pem = ident.files.ca_cert.read_text()
    entries: list[bytes] = []

    class Proposer:
        async def propose(self, data: bytes, request_id: bytes | None = None) -> Result:
            entries.append(data)
            return rep.apply([(len(entries), data)])[0]

    pyz = tmp_path / "meshgpu.pyz"
    with zipfile.ZipFile(pyz, "w") as z:
        z.writestr("site-packages/meshgpu/_build.json", json.dumps({"python": "3.11"}))
    return {
        "ident": ident,
        "rep": rep,
        "entries": entries,
        "proposer": Proposer(),
        "pyz": pyz,
        "key": _pem(),
    }


FLEET = """\
type: fleet
name: {name}
env:
  HF_TOKEN: {secret}
  PLAIN: x
ssh_config:
  user: root
  identity_file: ~/k
  hosts: [{host}]
"""


async def _apply(mesh: dict[str, Any], name: str, host: str) -> None:
    from meshgpu.ops.fleets import Fleets

    ops = Fleets(mesh["proposer"], mesh["rep"].cluster, mesh["rep"].jobs)
    text = FLEET.format(name=name, secret=SECRET_ENV, host=host)
    await ops.apply(text, "fleet.yml", {"~/k": mesh["key"]})


def _controller(mesh: dict[str, Any], bridge: Any) -> Any:
    from meshgpu.control.fleets import FleetController
    from meshgpu.security import JoinToken

    rep = mesh["rep"]

    async def create_token(ttl: float) -> str:
        return str(JoinToken.create(rep.cluster.cluster_id or "c1", "fp"))

    class Node:
        def status(self) -> dict[str, Any]:
            return {"voters": [1], "learners": []}

        async def remove(self, raft_id: int) -> None:
            raise AssertionError("not a member")

    return FleetController(
        Node(),
        rep.cluster,
        rep.jobs,
        mesh["proposer"],
        create_token,
        mesh["ident"].ca_key_path,
        lambda: mesh["pyz"],
        lambda: bridge,
    )


async def test_two_fleets_on_one_host_get_their_own_unit_and_dir(
    mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshgpu.devenv.aio import AsyncioThread

    conn = FakeConn("/root/.meshgpu-agent", systemd=True)
    copied: list[str] = []

    async def connect(t: ssh.Target, host_key: str = "") -> tuple[FakeConn, str]:
        assert t.key == mesh["key"]  # unsealed by the controller
        return conn, "SHA256:hostkey"

    async def put_file(c: Any, local: Path, remote: str) -> None:
        copied.append(remote)

    monkeypatch.setattr(ssh, "connect", connect)
    monkeypatch.setattr(ssh, "put_file", put_file)
    bridge = AsyncioThread("test-fleet-ssh")
    bridge.start()
    rep = mesh["rep"]
    # The same host in fleets of two meshes: here two fleets of one state, one after the other
    # (one mesh refuses a host in two of its fleets, so the first is applied, bootstrapped and
    # taken out of the state before the second).
    await _apply(mesh, "alpha", "10.0.0.1")
    ctl = _controller(mesh, bridge)
    f = rep.cluster.fleets.fleets["alpha"]
    await ctl._bootstrap(f, f.hosts["10.0.0.1"])  # noqa: SLF001
    facts_a, install_a = conn.scripts[-2:]
    assert 'B="${MESHGPU_HOME:-$HOME/.meshgpu-agent}"; D="$B"/alpha' in facts_a
    assert "systemctl is-active --quiet meshgpu-agent-alpha" in facts_a
    assert copied == ["/root/.meshgpu-agent/alpha/meshgpu.pyz"]
    unit_a = ssh.unit_text("alpha", "/root/.meshgpu-agent/alpha")
    assert (
        "cat > /etc/systemd/system/meshgpu-agent-alpha.service <<'MESHGPU_EOF'\n" + unit_a
    ) in install_a
    for line in (
        "systemctl daemon-reload",
        "systemctl enable meshgpu-agent-alpha >/dev/null 2>&1 || true",
        "systemctl start meshgpu-agent-alpha",
        "D=/root/.meshgpu-agent/alpha",
    ):
        assert line in install_a.splitlines(), (line, install_a)
    assert "setsid" not in install_a  # systemd supervises: no background process
    # the env, unsealed, goes to the host's agent.env (and to its jobs)
    assert f"HF_TOKEN={SECRET_ENV}" in install_a
    assert "MESHGPU_FLEET_ENV=HF_TOKEN,PLAIN" in install_a
    assert "--labels fleet=alpha,instance=0" in install_a

    # alpha goes (its uninstall names only its own unit and dir); beta comes to the same host
    await _uninstall(ctl, rep, "alpha", "10.0.0.1")
    uninstall_a = conn.scripts[-1]
    assert "systemctl disable --now meshgpu-agent-alpha" in uninstall_a
    assert "rm -f /etc/systemd/system/meshgpu-agent-alpha.service" in uninstall_a
    assert 'D="$B"/alpha' in uninstall_a and "beta" not in uninstall_a
    await _apply(mesh, "beta", "10.0.0.1")
    f = rep.cluster.fleets.fleets["beta"]
    await ctl._bootstrap(f, f.hosts["10.0.0.1"])  # noqa: SLF001
    install_b = conn.scripts[-1]
    assert "systemctl start meshgpu-agent-beta" in install_b.splitlines()
    assert "/etc/systemd/system/meshgpu-agent-beta.service" in install_b
    assert "ExecStart=/bin/sh /root/.meshgpu-agent/beta/run.sh" in install_b
    assert "alpha" not in install_b
    assert copied[-1] == "/root/.meshgpu-agent/beta/meshgpu.pyz"

    # every script is valid sh
    for script in conn.scripts:
        r = subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True, timeout=30)
        assert r.returncode == 0, (r.stderr, script)
    # the env value never went into the replicated state in plaintext
    assert all(SECRET_ENV.encode() not in e for e in mesh["entries"])
    snap = rep.snapshot()
    assert SECRET_ENV.encode() not in snap
    assert b"HF_TOKEN" in snap  # the names stay readable


async def _uninstall(ctl: Any, rep: Replicated, fleet: str, host: str) -> None:
    from meshgpu.state.fleets import DeleteFleet

    assert rep.cluster.apply_cmd(DeleteFleet(at=5, name=fleet)).ok
    await ctl.terminate(fleet, host)
    assert fleet not in rep.cluster.fleets.fleets


async def test_a_deleted_host_leaves_the_node_list(
    mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``terminate`` takes the host's node record out of the state (not only marked dead); a
    host that merely died keeps its record."""
    from meshgpu.devenv.aio import AsyncioThread
    from meshgpu.state.cluster import NodeUnreachable
    from meshgpu.state.fleets import UpdateFleetHost

    conn = FakeConn("/home/u/.meshgpu-agent", systemd=False)

    async def connect(t: ssh.Target, host_key: str = "") -> tuple[FakeConn, str]:
        return conn, "SHA256:hostkey"

    monkeypatch.setattr(ssh, "connect", connect)
    bridge = AsyncioThread("test-fleet-ssh")
    bridge.start()
    rep = mesh["rep"]
    await _apply(mesh, "gpus", "10.0.0.1")
    for node_id, name in (("n-fleet", "gpus-0"), ("n-other", "other")):
        reg = RegisterNode(at=1, node_id=node_id, name=name, api_url="https://x:7480")
        assert (await mesh["proposer"].propose(encode(reg))).ok
    upd = UpdateFleetHost(
        at=2,
        name="gpus",
        hostname="10.0.0.1",
        state="active",
        node_id="n-fleet",
        host_key="SHA256:hostkey",
    )
    assert (await mesh["proposer"].propose(encode_cluster(upd))).ok
    ctl = _controller(mesh, bridge)
    await _uninstall(ctl, rep, "gpus", "10.0.0.1")
    assert "n-fleet" not in rep.jobs.nodes
    assert 'D="$B"/gpus' in conn.scripts[-1]
    # a host that died (not deleted) stays listed, as dead
    await mesh["proposer"].propose(encode_cluster(NodeUnreachable(at=3, node_id="n-other")))
    assert rep.jobs.nodes["n-other"].status == "dead"
    # snapshots agree: restored, the deleted node is still gone
    other = Replicated()
    other.restore(rep.snapshot())
    assert set(other.jobs.nodes) == {"n-other"}


def test_the_unit_text() -> None:
    text = ssh.unit_text("gpus", "/root/.meshgpu-agent/gpus")
    assert text.splitlines() == [
        "[Unit]",
        "Description=meshgpu agent (SSH fleet gpus)",
        "After=network-online.target",
        "",
        "[Service]",
        "Environment=MESHGPU_SUPERVISED_BY_SYSTEMD=1",
        "ExecStart=/bin/sh /root/.meshgpu-agent/gpus/run.sh",
        "Restart=always",
        "RestartSec=2",
        "KillMode=control-group",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    assert ssh.unit_name("gpus") == "meshgpu-agent-gpus"


def test_python_mismatch_says_what_to_do() -> None:
    facts = ssh.parse_facts(_facts("/h/gpus", False).replace("pyver=3.11", "pyver=3.12"))
    with pytest.raises(ssh.HostError) as e:
        ssh.check_facts(facts, "3.11")
    msg = str(e.value)
    for part in (
        "python3 is 3.12",
        "built for Python 3.11",
        "pydantic-core",
        "install python3.11",
        "MESHGPU_AGENT_PYZ",
        "Python 3.12",
    ):
        assert part in msg, msg


def test_uninstall_stops_what_runs_in_the_fleet_dir_only(tmp_path: Path) -> None:
    """The uninstall script, run for real with sh: it kills the processes working in the
    fleet's directory (a job's), leaves another fleet's alone, and removes the directory (and
    the parent once empty)."""
    import os
    import time

    base = tmp_path / "agent-home"
    mine, other = base / "gpus", base / "other"
    for d in (mine / "data", other):
        d.mkdir(parents=True)
    job = subprocess.Popen(["sleep", "300"], cwd=mine / "data")
    keep = subprocess.Popen(["sleep", "300"], cwd=other)
    try:
        env = {**os.environ, "MESHGPU_HOME": str(base)}
        r = subprocess.run(
            ["sh", "-s"],
            input=ssh.uninstall_script("gpus", unit_dir=str(tmp_path / "units")),
            text=True,
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 10
        while job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.poll() is not None  # killed
        assert keep.poll() is None  # another fleet's process: untouched
        assert not mine.exists() and other.is_dir()
        keep.kill()
        keep.wait()
        shutil.rmtree(other)
        r = subprocess.run(
            ["sh", "-s"],
            input=ssh.uninstall_script("gpus"),
            text=True,
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert not base.exists()  # the last fleet gone: its parent too
    finally:
        for p in (job, keep):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_run_sh_resets_the_umask() -> None:
    """agent.env is written under umask 077; the agent itself runs under 022 (a root agent's
    /var/lib/meshgpu must stay traversable by the job user, or its next start refuses it)."""
    script = ssh.install_script("gpus", "/h/gpus", ["agent"], {}, systemd=False, restart=False)
    run_sh = script.split("cat > run.sh.tmp <<'MESHGPU_EOF'\n", 1)[1].split("MESHGPU_EOF", 1)[0]
    lines = run_sh.splitlines()
    assert lines.index("umask 022") < lines.index("while :; do")
