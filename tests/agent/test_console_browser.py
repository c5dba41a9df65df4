"""The console (``/ui``) in a real browser: Debian's ``chromium``, headless, driven by
Playwright for Python pointed at the system browser (no ``playwright install``). A 3-agent mesh;
the browser signs in on a node that is not the leader, watches a running job's log lines arrive
and its GPU chart draw, stops it with the button and sees the status change without a reload.

Screenshots of each page go to ``$MESHGPU_TEST_ARTIFACTS/console`` when that is set (CI keeps
them), else under the test's temporary directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.agent.conftest import start_mesh, stop_all, wait_for

CHROMIUM = shutil.which("chromium")
playwright = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium (Debian) is not installed")


def _goto(page: Any, url: str) -> None:
    """``page.goto``, again (at most 3 tries) when Chromium reports ERR_NETWORK_CHANGED: other
    tests on this machine add and remove interfaces (network namespaces), and Chromium aborts
    a navigation whenever the host's network changes."""
    for attempt in range(3):
        try:
            page.goto(url)
            return
        except playwright.Error as e:
            if "ERR_NETWORK_CHANGED" not in str(e) or attempt == 2:
                raise


def _shots(tmp_path: Path) -> Path:
    root = os.environ.get("MESHGPU_TEST_ARTIFACTS")
    out = Path(root) / "console" if root else tmp_path / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_console_on_a_follower_tails_charts_and_stops_a_run(tmp_path: Path) -> None:
    extra = ["--tick-ms", "50", "--history-interval-ms", "300"]
    agents = start_mesh(
        tmp_path, {"a": "1xA100:40GB", "b": "2xH100:80GB", "c": "1xA100:40GB"}, extra
    )
    shots = _shots(tmp_path)
    try:
        ca = agents[0].client()
        wait_for(lambda: len(ca.nodes()) == 3)
        leader = wait_for(lambda: ca.status()["leader"])
        # A follower that is not the job's host either (node-b has the only H100s): its log and
        # history come over the peer port.
        follower = next(
            a for a in agents if a.client().status()["raft_id"] != leader and a.name != "node-b"
        )
        assert follower.client().status()["role"] != "leader"
        ca.submit(
            "type: task\ncommands:\n"
            '  - i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.2; done\n'
            "resources:\n  gpu: H100:1\n",
            name="ticker",
        )
        wait_for(lambda: ca.run("ticker")["status"] == "running")
        assert ca.run("ticker")["jobs"][0]["node"] == "node-b" != follower.name

        errors: list[str] = []
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
            )
            # The API's certificate is from the cluster's own CA, which the browser does not know.
            context = browser.new_context(ignore_https_errors=True)
            page = context.new_page()
            page.set_default_timeout(20_000)

            def console_error(msg: Any) -> None:
                if msg.type == "error":
                    errors.append(msg.text)

            page.on("console", console_error)
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            # Not signed in: any page sends us to the sign-in page.
            _goto(page, f"{follower.url}/ui/runs")
            assert page.url.endswith("/ui/login")
            # A wrong token is refused, and says so.
            page.fill("#token", "not-the-token")
            page.click("button[type=submit]")
            page.wait_for_selector("#login-error:has-text('not this cluster')")
            assert page.url.endswith("/ui/login")
            assert not [c for c in context.cookies() if c["name"] == "meshgpu_ui"]
            page.screenshot(path=str(shots / "login-refused.png"))
            errors.clear()  # the browser logs the 401 of that refusal as a console error

            page.fill("#token", follower.token)
            page.click("button[type=submit]")
            page.wait_for_url("**/ui/runs")
            [cookie] = [c for c in context.cookies() if c["name"] == "meshgpu_ui"]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["secure"]
            assert follower.token not in page.url
            row = page.locator("tr[data-run=ticker]")
            row.locator(".st-running").wait_for()
            page.screenshot(path=str(shots / "runs.png"))

            # The run: live log lines arrive, the GPU chart draws the job's GPU.
            row.locator("a").click()
            page.wait_for_url("**/ui/runs/ticker")
            page.wait_for_selector("#log span:has-text('tick')")
            first = page.locator("#log span").count()
            wait_for(lambda: page.locator("#log span").count() >= first + 5, timeout=20)
            last = page.locator("#log span").last.text_content() or ""
            assert last.startswith("tick ")
            gpu_line = page.locator("#chart-gpu path.line")
            gpu_line.first.wait_for()
            assert gpu_line.first.get_attribute("data-series") == "gpu" + str(
                ca.run("ticker")["jobs"][0]["gpus"][0]
            )
            wait_for(lambda: int(page.locator("#chart-gpu").get_attribute("data-points") or 0) >= 3)
            assert (gpu_line.first.get_attribute("d") or "").count("L") >= 2
            page.locator("#chart-cpu path.line").wait_for()
            page.screenshot(path=str(shots / "run.png"), full_page=True)

            # Stop with the button: the status changes in place (no navigation, no reload).
            page.evaluate("window.__stayed = true")
            page.locator("#run button.stop").click()
            page.wait_for_selector("#run .runhead .st:not(.st-running)")
            page.wait_for_selector("#run .runhead .st-terminated, #run .runhead .st-done")
            assert page.evaluate("window.__stayed") is True
            wait_for(lambda: ca.run("ticker")["status"] in ("terminated", "done", "aborted"))
            page.wait_for_selector("#log .note")  # the tail says the job ended
            page.screenshot(path=str(shots / "run-stopped.png"), full_page=True)

            # Nodes: every host, roles, gossip, each GPU's health and live utilization.
            _goto(page, f"{follower.url}/ui/nodes")
            for name in ("node-a", "node-b", "node-c"):
                page.locator(f"section[data-node={name}]").wait_for()
            assert page.locator("section[data-node=node-b] li[data-gpu]").count() == 2
            assert "healthy" in (page.locator("section[data-node=node-b]").text_content() or "")
            assert "alive" in (page.locator("section[data-node=node-a]").text_content() or "")
            page.screenshot(path=str(shots / "nodes.png"), full_page=True)

            # Cluster: the leader as this follower sees it, the members.
            _goto(page, f"{follower.url}/ui/cluster")
            leader_name = next(n["name"] for n in ca.nodes() if n["role"] == "leader")
            assert page.locator("#leader").text_content() == leader_name
            page.screenshot(path=str(shots / "cluster.png"), full_page=True)

            # Without a leader (the other two agents gone: no quorum) this node still shows
            # the mesh: pages read its own replica.
            for other in agents:
                if other is not follower:
                    other.kill()
            for path in ("runs", "nodes", "cluster"):
                _goto(page, f"{follower.url}/ui/{path}")
                assert page.url.endswith(f"/ui/{path}")
            _goto(page, f"{follower.url}/ui/runs")
            page.locator("tr[data-run=ticker]").wait_for()

            # No page had a console error (what follows signs out: the open page's next
            # refresh is refused, which the browser logs).
            before_sign_out = list(errors)
            # Sign out: the pages want a sign-in again.
            _goto(page, f"{follower.url}/ui/runs")
            page.click("#logout")
            page.wait_for_url("**/ui/login")
            _goto(page, f"{follower.url}/ui/nodes")
            assert page.url.endswith("/ui/login")
            browser.close()
        assert before_sign_out == [], before_sign_out
        assert sorted(f.name for f in shots.iterdir()) == [
            "cluster.png",
            "login-refused.png",
            "nodes.png",
            "run-stopped.png",
            "run.png",
            "runs.png",
        ]
    finally:
        stop_all(agents)
