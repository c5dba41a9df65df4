"""A configuration field the mesh cannot honour, refused over the API like a parse error: a
problem document with the located issues (``meshgpu/config/support.py``)."""

from __future__ import annotations

from pathlib import Path

from meshgpu.api.problems import MEDIA_TYPE
from tests.api._stub import StubAgent, api
from tests.scheduler._world import host, world

CONFIG = "type: task\ncommands: [train]\nprivileged: true\nvolumes:\n  - data:/data\n"


async def test_refused_fields_come_back_located_in_a_problem(tmp_path: Path) -> None:
    agent = StubAgent(world(host("n1", 0)), tmp_path)
    body = {"config": CONFIG, "filename": "train.dstack.yml", "request_id": "request-0001"}
    async with api(agent) as c:
        r = await c.post("/api/v1/runs", json=body)
        runs = (await c.get("/api/v1/runs")).json()
    # The status of every invalid configuration at submit (a parse error's too).
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == MEDIA_TYPE
    doc = r.json()
    assert (doc["title"], doc["code"]) == ("invalid configuration", "invalid_config")
    assert [(i["file"], i["line"], i["col"], i["path"]) for i in doc["issues"]] == [
        ("train.dstack.yml", 3, 1, "privileged"),
        ("train.dstack.yml", 5, 5, "volumes[0].name"),
    ]
    # What the CLI prints (the detail): file:line:col: path: reason, one per line.
    assert (
        "train.dstack.yml:3:1: privileged: privileged needs a container runtime; no member "
        in (doc["detail"])
    )
    assert (
        "train.dstack.yml:5:5: volumes[0].name: named volume 'data': network volumes are "
        in (doc["detail"])
    )
    assert not (runs.get("runs") if isinstance(runs, dict) else runs)


def test_apply_refuses_before_uploading(tmp_path, monkeypatch):
    """``meshgpu apply`` checks what no mesh can honour before archiving and uploading the
    code: the refusal names the line, and no node is contacted (the URL is unreachable)."""
    from typer.testing import CliRunner

    from meshgpu.cli import app

    conf = tmp_path / "task.dstack.yml"
    conf.write_text("type: task\ncommands: [echo hi]\ndstack: true\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["apply", "-f", str(conf), "-y", "--url", "https://127.0.0.1:9"]
    )
    assert result.exit_code == 1
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert f"{conf}:3:1: dstack:" in text
    assert "connect" not in text.lower()
