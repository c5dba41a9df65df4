"""The console's routes in-process (api/ui.py): sign-in into an HttpOnly cookie, the CSRF
header on writes, what a page without a sign-in gets, escaping, and /openapi.json without it."""

from __future__ import annotations

from pathlib import Path

import httpx

from meshgpu.api.app import create_app
from meshgpu.api.ui import COOKIE
from tests.api._stub import TOKEN, StubAgent
from tests.scheduler._world import host, schedule, submit, task, world

CSRF = {"X-Meshgpu-CSRF": "1"}


def _client(agent: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(agent)),  # type: ignore[arg-type]
        base_url="https://node",
    )


async def test_sign_in_keeps_the_token_in_an_httponly_strict_cookie(tmp_path: Path) -> None:
    sm = world(host("n1", 8), submit("train", task("H100:2"), at=1))
    schedule(sm)
    async with _client(StubAgent(sm, tmp_path)) as c:
        r = await c.get("/ui/runs")
        assert r.status_code == 303 and r.headers["location"] == "/ui/login"
        frag = await c.get("/ui/fragments/runs")
        assert frag.status_code == 401  # a fragment is not redirected into the page
        assert (await c.get("/ui/api/runs/train/history")).status_code == 401
        # The bearer token is not the console's way in, and the API's is not the console's.
        bearer = await c.get("/ui/runs", headers={"Authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 303
        page = await c.get("/ui/login")
        assert page.status_code == 200 and 'type="password"' in page.text
        assert (
            (await c.get("/ui/static/ui.js")).headers["content-type"].startswith("text/javascript")
        )
        assert (await c.get("/ui/static/nope.js")).status_code in (303, 404)

        # Sign-in: the CSRF header, then JSON with the token; bad ones say what is wrong.
        no_csrf = await c.post("/ui/login", json={"token": TOKEN})
        assert no_csrf.status_code == 403 and "x-meshgpu-csrf" in no_csrf.json()["detail"]
        wrong = await c.post("/ui/login", json={"token": "nope"}, headers=CSRF)
        assert wrong.status_code == 401 and "not this cluster" in wrong.json()["detail"]
        assert COOKIE not in wrong.cookies
        junk = await c.post("/ui/login", content=b"token=x", headers=CSRF)
        assert junk.status_code == 400 and '{"token"' in junk.json()["detail"]
        huge = await c.post("/ui/login", content=b"x" * 5000, headers=CSRF)
        assert huge.status_code == 413
        ok = await c.post("/ui/login", json={"token": TOKEN}, headers=CSRF)
        assert ok.status_code == 204
        cookie = ok.headers["set-cookie"]
        for attr in ("HttpOnly", "Secure", "SameSite=strict", "Path=/ui"):
            assert attr in cookie, cookie

        for path in ("/ui/runs", "/ui/runs/train", "/ui/nodes", "/ui/cluster"):
            r = await c.get(path)
            assert r.status_code == 200 and "<!doctype html>" in r.text, path
            assert TOKEN not in r.text  # never in a page
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
            assert r.headers["x-frame-options"] == "DENY"
        assert "train" in (await c.get("/ui/fragments/runs")).text
        hist = (await c.get("/ui/api/runs/train/history")).json()
        assert hist["run"] == "train" and hist["jobs"][0]["node"] == "n1"
        missing = await c.get("/ui/runs/nope")
        assert "No run nope" in missing.text

        # A write without the CSRF header is refused even signed in; with it, it stops.
        assert (await c.post("/ui/runs/train/stop")).status_code == 403
        stop = await c.post("/ui/runs/train/stop", headers=CSRF)
        assert stop.status_code == 200 and stop.json()["status"] in ("terminating", "terminated")

        out = await c.post("/ui/logout", headers=CSRF)
        assert out.status_code == 204 and f'{COOKIE}=""' in out.headers["set-cookie"]
        c.cookies.clear()
        assert (await c.get("/ui/nodes")).status_code == 303

        # The console is not part of the API's description (schemathesis walks that).
        doc = await c.get("/openapi.json")
        assert not [p for p in doc.json()["paths"] if p.startswith("/ui")]


async def test_names_and_reasons_are_escaped(tmp_path: Path) -> None:
    sm = world(host("n1", 8), submit("xss", task("H100:16"), at=1))  # can never fit: a reason
    schedule(sm)
    agent = StubAgent(sm, tmp_path)
    node = sm.nodes["n1"]
    node.labels["team"] = "<script>alert(1)</script>"
    node.gpus[3].healthy = False  # as the leader's SetGPUHealth leaves it
    node.gpus[3].health_reason = "XID 79"
    async with _client(agent) as c:
        c.cookies.set(COOKIE, TOKEN)
        nodes = (await c.get("/ui/nodes")).text
        assert "<script>alert(1)</script>" not in nodes and "&lt;script&gt;" in nodes
        assert "unhealthy: XID 79" in nodes and nodes.count(">healthy<") == 7
        runs = (await c.get("/ui/fragments/runs")).text
        assert "xss" in runs and "<td>" in runs


async def test_the_console_shows_and_does_only_what_the_api_allows(tmp_path: Path) -> None:
    """Signed in with bob's token, the console is the API for bob: alice's run (project a)
    is not in the runs list nor the cluster page, its page, fragment, log events and history
    are "no such run", and its Stop is refused as the API would (404), while his own run shows
    and stops."""
    from tests.api.test_access import _setup, _submit, as_user

    agent = StubAgent(world(host("n1", 8)), tmp_path)
    tokens = await _setup(agent)
    async with (
        as_user(agent, tokens["alice"], "a") as alice,
        as_user(agent, tokens["bob"], "b") as bob,
    ):
        assert (await _submit(alice, "alice-run")).status_code == 201
        assert (await _submit(bob, "bob-run")).status_code == 201
    async with _client(agent) as c:
        c.cookies.set(COOKIE, tokens["bob"])
        runs = (await c.get("/ui/runs")).text
        assert "bob-run" in runs and "alice-run" not in runs
        assert "alice-run" not in (await c.get("/ui/fragments/runs")).text
        assert "alice-run" not in (await c.get("/ui/cluster")).text
        page = await c.get("/ui/runs/alice-run")
        assert "No run alice-run" in page.text and "chart-gpu" not in page.text
        assert "No run" in (await c.get("/ui/fragments/runs/alice-run")).text
        assert (await c.get("/ui/runs/alice-run/events")).status_code == 404
        assert (await c.get("/ui/api/runs/alice-run/history")).status_code == 404
        stop = await c.post("/ui/runs/alice-run/stop", headers=CSRF)
        assert stop.status_code == 404
        assert not agent.state.runs["alice-run"].status.is_finished()
        assert agent.state.runs["alice-run"].termination_reason is None
        assert "chart-gpu" in (await c.get("/ui/runs/bob-run")).text
        assert (await c.post("/ui/runs/bob-run/stop", headers=CSRF)).status_code == 200
        # the founding admin sees every project's runs
        c.cookies.set(COOKIE, TOKEN)
        runs = (await c.get("/ui/fragments/runs")).text
        assert "alice-run" in runs and "bob-run" in runs
