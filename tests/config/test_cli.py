"""``meshgpu config validate|schema`` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests._paths import CORPUS

GOOD = CORPUS / "valid" / "task--examples__misc__http.server__task.dstack--1e1d051c5f.yml"


def meshgpu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshgpu", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_validate_good_file_prints_plan() -> None:
    r = meshgpu("config", "validate", str(GOOD))
    assert r.returncode == 0, r.stderr
    assert "task" in r.stdout and "resources" in r.stdout and "cpu=2.." in r.stdout


def test_validate_json_is_normalized() -> None:
    r = meshgpu("config", "validate", "--json", str(GOOD))
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert doc["valid"] is True
    assert doc["config"]["ports"] == [{"local_port": 8000, "container_port": 8000}]
    assert doc["config"]["resources"]["disk"] == {"size": {"min": 100.0, "max": None}}


def test_bad_files_exit_1_with_every_problem_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dstack.yml"
    bad.write_text("type: task\ncomands: [ls]\nresources: {gpu: 'A100:8:8'}\n")
    r = meshgpu("config", "validate", str(GOOD), str(bad), str(tmp_path / "missing.yml"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    assert f"{bad}:2:1: comands: unknown field (did you mean 'commands'?)" in r.stderr
    assert "gives the count twice" in r.stderr
    assert "missing.yml: file not found" in r.stderr
    j = meshgpu("config", "validate", "--json", str(bad))
    doc = json.loads(j.stdout)
    assert j.returncode == 1 and doc["valid"] is False
    assert {i["path"] for i in doc["issues"]} == {"comands", "resources.gpu"}


def test_schema_is_json_schema() -> None:
    r = meshgpu("config", "schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert schema["$schema"].endswith("2020-12/schema")
    assert {"TaskConfiguration", "ServiceConfiguration", "FleetConfiguration"} <= set(
        schema["$defs"]
    )


def test_validate_refuses_what_no_mesh_can_honour_at_its_line(tmp_path: Path) -> None:
    """The second layer (config/support.py), offline: only what no mesh could honour; what
    depends on the mesh (an image needs a member with docker) waits for apply."""
    f = tmp_path / "svc.dstack.yml"
    f.write_text("type: service\nport: 8000\nimage: x\ncommands: [s]\ngateway: team/gw\n")
    r = meshgpu("config", "validate", str(f))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{f}:5:1: gateway: gateway team/gw: meshgpu has no gateways" in r.stderr
    assert "image" not in r.stderr
    j = json.loads(meshgpu("config", "validate", "--json", str(f)).stdout)
    assert j["valid"] is False and [i["path"] for i in j["issues"]] == ["gateway"]
