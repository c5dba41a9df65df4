"""Bad SSH fleet files are refused at apply with file:line:col: an identity_file that cannot be
read where the CLI runs, a host given twice, a network that is not private."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshgpu.config import ConfigError, parse_config
from meshgpu.testing import this_meshgpu_env

FLEET = """\
type: fleet
name: gpus
ssh_config:
  user: root
  identity_file: {key}
{extra}  hosts:
    - 10.0.0.1
    - hostname: 10.0.0.2
{more}"""


def _issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "fleet.yml")
    return [str(i) for i in e.value.issues]


def test_host_given_twice() -> None:
    text = FLEET.format(key="k", extra="", more="    - hostname: 10.0.0.1\n")
    assert _issues(text) == [
        "fleet.yml:9:7: ssh_config.hosts[2]: host 10.0.0.1 is given twice (also hosts[0]): "
        "list each host once"
    ]


def test_public_network() -> None:
    text = FLEET.format(key="k", extra="  network: 8.8.8.0/24\n", more="")
    assert _issues(text) == [
        "fleet.yml:6:12: ssh_config.network: network must be a private range, got 8.8.8.0/24"
    ]


def test_missing_identity_file_is_located(tmp_path: Path) -> None:
    """The CLI reads the keys before it sends anything: a missing one is a located error, and
    nothing reaches a member (no --url is even needed)."""
    f = tmp_path / "fleet.yml"
    f.write_text(
        FLEET.format(
            key=tmp_path / "nope",
            extra="",
            more=f"      identity_file: {tmp_path / 'nope2'}\n",
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "meshgpu", "apply", "-f", str(f), "-y"],
        capture_output=True,
        text=True,
        env=this_meshgpu_env() | {"MESHGPU_URL": "http://127.0.0.1:9"},
        timeout=60,
        check=False,
    )
    assert r.returncode == 1
    assert f"{f}:5:18: ssh_config.identity_file: cannot read the private key" in r.stderr, r.stderr
    assert f"{f}:9:22: ssh_config.hosts[1].identity_file: cannot read" in r.stderr, r.stderr
    assert "No such file or directory" in r.stderr


def test_join_refuses_another_version() -> None:
    """A host whose agent is another version is refused with a message that says so."""
    import trio

    from meshgpu.errors import Conflict
    from meshgpu.ops.admission import Admission

    adm = Admission.__new__(Admission)

    async def go() -> None:
        with pytest.raises(Conflict) as e:
            await adm._admit({"agent_version": "0.0.1"})  # noqa: SLF001
        assert "runs meshgpu 0.0.1 and the mesh runs" in str(e.value.detail)
        assert e.value.code == "version_mismatch"

    trio.run(go)
