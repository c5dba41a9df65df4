"""Client profiles: several nodes to try, members remembered in the profile file."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshgpu.client.http import load_profile, write_profile


def test_comma_separated_urls_are_fallbacks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("MESHGPU_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("MESHGPU_URL", "http://a:7480/, http://b:7480,http://a:7480")
    p = load_profile()
    assert p.url == "http://a:7480" and p.members == ("http://b:7480",)
    assert p.path is None  # nothing to write back to


def test_members_in_the_profile_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    f = tmp_path / "client.toml"
    write_profile(f, "http://a:7480", "tok", ("http://b:7480", "http://c:7480"))
    monkeypatch.delenv("MESHGPU_URL", raising=False)
    monkeypatch.delenv("MESHGPU_TOKEN", raising=False)
    monkeypatch.setenv("MESHGPU_CONFIG", str(f))
    p = load_profile()
    assert (p.url, p.token, p.members, p.path) == (
        "http://a:7480",
        "tok",
        ("http://b:7480", "http://c:7480"),
        f,
    )
    # An explicit --url talks to that node; the file's members belong to its node.
    q = load_profile("http://z:7480")
    assert q.url == "http://z:7480" and q.members == () and q.path is None


async def test_members_header_only_on_authenticated_answers(tmp_path: Path) -> None:
    import httpx

    from meshgpu.api.app import create_app
    from tests.api._stub import StubAgent, api
    from tests.scheduler._world import host, world

    agent = StubAgent(world(host("n1")), tmp_path)
    async with api(agent) as c:
        ok = await c.get("/api/v1/runs")
        assert ok.status_code == 200 and ok.headers["x-meshgpu-members"] == "http://peer-1:7480"
        assert "x-meshgpu-members" not in (await c.get("/healthz")).headers
    anon = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(agent)),  # type: ignore[arg-type]
        base_url="http://node",
    )
    async with anon:
        r = await anon.get("/api/v1/runs")
        assert r.status_code == 401 and "x-meshgpu-members" not in r.headers
