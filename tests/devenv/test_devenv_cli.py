"""The CLI side of dev environments: IDE links, ps -v's activity words, the example config."""

from __future__ import annotations

from pathlib import Path

from meshgpu.cli._devenv import activity_text, connect_lines, ide_link
from meshgpu.config import load_config
from meshgpu.config.render import plan_lines, to_json
from meshgpu.config.spec import compile_run

ROOT = Path(__file__).resolve().parents[2]


def test_ide_links_are_dstacks() -> None:
    w = "/data/jobs/j1/work"
    assert ide_link("vscode", "dev", w) == (
        "VS Code",
        "vscode://vscode-remote/ssh-remote+dev/data/jobs/j1/work",
    )
    assert ide_link("cursor", "dev", w)[1] == "cursor://vscode-remote/ssh-remote+dev" + w  # type: ignore[index]
    assert ide_link("windsurf", "dev", w)[1] == "windsurf://vscode-remote/ssh-remote+dev" + w  # type: ignore[index]
    assert ide_link("zed", "dev", w)[1] == "zed://ssh/dev" + w  # type: ignore[index]
    assert ide_link(None, "dev", w) is None
    assert ide_link("vscode", "dev", None)[1].endswith("ssh-remote+dev/")  # type: ignore[index]


def test_connect_lines_and_activity_words() -> None:
    run = {
        "name": "dev",
        "type": "dev-environment",
        "dev_environment": {"ide": "cursor", "inactivity_duration": 1800},
        "jobs": [{"working_dir": "/w", "status": "running"}],
    }
    text = "\n".join(connect_lines(run))
    assert "cursor://vscode-remote/ssh-remote+dev/w" in text and "ssh dev" in text
    assert "30m" in text
    job = {"status": "running", "sessions": 0, "inactivity_secs": 75}
    assert activity_text(job, run) == "idle 75s of 30m"
    assert activity_text({**job, "sessions": 2}, run) == "attached (2 sessions)"
    assert activity_text({**job, "status": "done"}, run) == ""
    task = {"type": "task", "dev_environment": None}
    assert activity_text(job, task) == ""  # a task nobody attached to: nothing to say
    assert activity_text({**job, "sessions": 1}, task) == "attached (1 session)"


def test_the_example_dev_environment() -> None:
    config = load_config(ROOT / "examples/dev-environment/dev.dstack.yml")
    spec = compile_run(to_json(config))
    assert spec.type == "dev-environment" and spec.ide == "vscode"
    assert spec.inactivity_duration_s == 1800
    assert spec.utilization is not None and spec.utilization.time_window_s == 3600
    assert spec.host_ports == (8888,)
    assert spec.jobs[0].commands[-1] == "exec tail -f /dev/null"
    rows = dict(plan_lines(config))
    assert rows["inactivity duration"] == "30m"
    assert "below 5%" in rows["utilization policy"]
