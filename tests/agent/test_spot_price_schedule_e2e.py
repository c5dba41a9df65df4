"""A real agent: ``--spot --price 1.5`` become the node's ``spot``/``price`` labels (what
``spot_policy``/``max_price`` filter on), and a scheduled run applied to it waits PENDING with
its next start, which ``meshgpu ps`` shows (the start itself is tested under a fake clock:
tests/ops/test_schedules_controller.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from meshgpu.config.cron import next_start
from tests.agent.conftest import loopback_agent


def test_spot_and_price_flags_and_a_scheduled_run(tmp_path: Path) -> None:
    agent = loopback_agent(
        tmp_path, "agent", "1xH100:80GB", extra=["--spot", "--price", "1.5", "--labels", "zone=a"]
    )
    try:
        agent.start()
        c = agent.client()
        [node] = c.nodes()
        assert node["labels"] == {"zone": "a", "spot": "true", "price": "1.5"}

        proj = tmp_path / "proj"
        proj.mkdir()
        (proj / "weekly.dstack.yml").write_text(
            "type: task\nname: weekly\ncommands: [echo hi]\nspot_policy: auto\nmax_price: 2\n"
            "schedule:\n  cron: '0 9 * * 0'\n"
        )
        before = time.time()
        r = agent.cli("apply", "-f", "weekly.dstack.yml", "-y", cwd=proj)
        assert r.returncode == 0, r.stderr + r.stdout
        run = c.run("weekly")
        assert run["status"] == "pending" and run["jobs"] == []
        start = datetime.fromtimestamp(run["next_triggered_at"], UTC)
        assert start.strftime("%A %H:%M") == "Monday 09:00"  # day-of-week 0 = Monday
        assert run["next_triggered_at"] == next_start(["0 9 * * 0"], run["submitted_at"])
        assert run["submitted_at"] >= before - 1
        assert f"next start {start:%Y-%m-%d %H:%M} UTC" in r.stdout
        ps = agent.cli("ps")
        assert ps.returncode == 0 and "next start" in ps.stdout and "pending" in ps.stdout
        assert agent.cli("stop", "weekly", "-y").returncode == 0
        assert c.run("weekly")["status"] == "terminated"
    finally:
        agent.close()
