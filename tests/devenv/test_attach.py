"""``meshgpu attach``: the key, the ``Host`` entries, the pinned host keys and the Include it
writes, and the real OpenSSH client using them (through ``meshgpu ssh-proxy`` to the stand-in
sshd)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio
from typer.testing import CliRunner

from meshgpu.cli import _attach
from meshgpu.cli._app import app
from meshgpu.cli._attach import (
    SSHFiles,
    config_block,
    ensure_include,
    ensure_key,
    known_hosts_text,
    port_forwards,
    replace_block,
)
from meshgpu.client import APIError
from tests.devenv._tunnel import api_node, keygen, needs_openssh, openssh_server, run


def test_key_is_made_once_and_private(tmp_path: Path) -> None:
    files = SSHFiles(tmp_path)
    line = ensure_key(files)
    assert line.startswith("ssh-ed25519 ")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert ensure_key(files) == line


def test_entries_per_run_replace_their_own_block_only(tmp_path: Path) -> None:
    files = SSHFiles(tmp_path)
    a = config_block("a", 2, 0, files, "meshgpu-c", None)
    assert "Host a\n" in a and "Host a-0\n" in a and "Host a-1\n" in a
    assert "User a\n" in a and "User a-1\n" in a
    assert "StrictHostKeyChecking yes" in a and "HostKeyAlias meshgpu-c" in a
    assert "ssh-proxy a --job 1" in a
    b = config_block("b", 1, 0, files, "meshgpu-c", None)
    text = replace_block(replace_block("Host other\n", "a", a), "b", b)
    a2 = config_block("a", 1, 0, files, "meshgpu-c", None)
    text = replace_block(text, "a", a2)
    assert text.count("Host a-0") == 1 and "Host a-1" not in text
    assert "Host b\n" in text and text.startswith("Host other\n")
    assert "Host a\n" not in replace_block(text, "a", None)


def test_known_hosts_pin_every_node_key_under_the_cluster_alias() -> None:
    old = "meshgpu-c ssh-ed25519 OLD\nother ssh-rsa KEEP\n"
    text = known_hosts_text(old, "meshgpu-c", ["ssh-ed25519 AAA n0", "ssh-ed25519 BBB n1"])
    assert text.splitlines() == [
        "other ssh-rsa KEEP",
        "meshgpu-c ssh-ed25519 AAA",
        "meshgpu-c ssh-ed25519 BBB",
    ]


def test_include_goes_first_once(tmp_path: Path) -> None:
    files = SSHFiles(tmp_path)
    files.user_config.parent.mkdir()
    files.user_config.write_text("Host x\n    User y\n")
    ensure_include(files)
    ensure_include(files)
    text = files.user_config.read_text()
    assert text.startswith(f"Include {files.config}\n") and text.count("Include") == 1


def test_ports_of_a_task_and_a_service() -> None:
    view = {"type": "task", "config": {"ports": [8080, "80:8000", "*:9000"]}}
    assert port_forwards(view) == [(8080, 8080), (80, 8000), (None, 9000)]
    svc = {"type": "service", "config": {"port": {"local_port": 8000, "container_port": 8000}}}
    assert port_forwards(svc) == [(8000, 8000)]


def test_ports_of_a_task_group_are_forwarded_for_its_jobs() -> None:
    groups = [{"name": "a", "ports": [8080]}, {"name": "b", "ports": ["*:9000"]}]
    view = {
        "type": "task",
        "config": {"groups": groups},
        "jobs": [{"group": "a"}, {"group": "b"}],
    }
    assert port_forwards(view, 0) == [(8080, 8080)]
    assert port_forwards(view, 1) == [(None, 9000)]


@needs_openssh
async def test_attach_then_plain_ssh_reaches_the_job_through_another_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Key registration (``POST /api/v1/ssh/keys``) is the SSH server's route, not on this
    branch's stub API: a 404 from it is tolerated here, and only here."""
    real = _attach.register_key

    def register_tolerating_404(c: object, public_key: str) -> None:
        try:
            real(c, public_key)  # type: ignore[arg-type]
        except APIError as e:
            if e.status != 404:
                raise

    monkeypatch.setattr(_attach, "register_key", register_tolerating_404)
    with openssh_server(tmp_path) as sshd:
        async with api_node(tmp_path, f"127.0.0.1:{sshd.port}") as node:
            n0 = node.state.nodes["n0"]
            node.state.nodes["n0"] = n0.model_copy(update={"ssh_host_key": sshd.host_pub})
            for k, v in node.env().items():
                monkeypatch.setenv(k, v)
            result = await trio.to_thread.run_sync(
                lambda: CliRunner().invoke(app, ["attach", "dev", "--config-only"])
            )
            assert result.exit_code == 0, result.output
            files = SSHFiles(tmp_path)
            # the stand-in sshd accepts the key attach made (the agent's would, once registered)
            auth = tmp_path / "sshd" / "authorized_keys"
            auth.write_text(auth.read_text() + files.key.with_suffix(".pub").read_text())
            assert f"Include {files.config}" in files.user_config.read_text()
            argv = ["ssh", "-F", str(files.config), "-o", "BatchMode=yes", "-l", "root"]
            r = await run([*argv, "dev", "echo attached"], env=node.env())
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"attached\n"
            # a host key that is not the cluster's: refused
            other = keygen(tmp_path / "other_host_key")
            node.state.nodes["n0"] = n0.model_copy(update={"ssh_host_key": other})
            result = await trio.to_thread.run_sync(
                lambda: CliRunner().invoke(app, ["attach", "dev", "--config-only"])
            )
            assert result.exit_code == 0, result.output
            r = await run([*argv, "dev-0", "true"], env=node.env())
            assert r.returncode != 0 and b"host key" in r.stderr.lower(), r.stderr
    assert os.environ.get("HOME") == str(tmp_path)
