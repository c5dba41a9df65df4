"""Lists a page at a time: ``limit`` + opaque ``cursor``, newest first, ``next_cursor`` null at
the end, no configurations in list items -- and the client and ``meshgpu ps`` on top."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from typer.testing import CliRunner

from meshgpu.api import create_app
from meshgpu.api.views import encode_cursor
from meshgpu.client import Client
from meshgpu.client.http import Profile
from meshgpu.state import StateMachine, StopRun
from tests.api._stub import TOKEN, StubAgent, api
from tests.scheduler._world import host, submit, task, world


def runs_world(n: int, finished: int = 0) -> StateMachine:
    """``n`` runs submitted a second apart (run-0000 first); the first ``finished`` are done."""
    sm = world(host("n1", 8), host("n2", 8), host("n3", 8))
    for i in range(n):
        sm.apply_command(submit(f"run-{i:04d}", task("H100:1"), at=10.0 + i))
    for i in range(finished):  # waiting runs stopped: finished at once
        sm.apply_command(StopRun(at=5_000.0, run_name=f"run-{i:04d}", abort=True))
    return sm


async def walk(c: Any, path: str, key: str, **params: Any) -> list[list[dict[str, Any]]]:
    pages, cursor = [], None
    while True:
        r = await c.get(path, params=params | ({"cursor": cursor} if cursor else {}))
        assert r.status_code == 200, r.text
        doc = r.json()
        pages.append(doc[key])
        cursor = doc["next_cursor"]
        if cursor is None:
            return pages


async def test_runs_come_a_page_at_a_time_newest_first_without_configs(tmp_path: Path) -> None:
    sm = runs_world(250)
    async with api(StubAgent(sm, tmp_path)) as c:
        first = (await c.get("/api/v1/runs")).json()
        pages = await walk(c, "/api/v1/runs", "runs")
        small = await walk(c, "/api/v1/runs", "runs", limit=7)
        one = (await c.get("/api/v1/runs/run-0003")).json()
    assert len(first["runs"]) == 100 and isinstance(first["next_cursor"], str)
    assert [len(p) for p in pages] == [100, 100, 50]
    names = [r["name"] for p in pages for r in p]
    assert names == [f"run-{i:04d}" for i in reversed(range(250))]
    assert [r["name"] for p in small for r in p] == names and len(small) == 36
    assert all("config" not in r for p in pages for r in p)
    assert pages[0][0]["jobs"][0]["status"] == "submitted"  # jobs stay: ps shows them
    assert one["config"]["type"] == "task"  # the single run keeps its configuration


async def test_active_by_default_finished_with_all(tmp_path: Path) -> None:
    sm = runs_world(30, finished=10)
    async with api(StubAgent(sm, tmp_path)) as c:
        active = await walk(c, "/api/v1/runs", "runs", limit=8)
        every = await walk(c, "/api/v1/runs", "runs", all="true", limit=8)
    assert [r["name"] for p in active for r in p] == [f"run-{i:04d}" for i in range(29, 9, -1)]
    assert len([r for p in every for r in p]) == 30


async def test_a_cursor_holds_its_place_while_runs_come_and_go(tmp_path: Path) -> None:
    sm = runs_world(10)
    async with api(StubAgent(sm, tmp_path)) as c:
        first = (await c.get("/api/v1/runs", params={"limit": 4})).json()
        for i in range(10, 15):  # newer runs arrive: they do not push older ones onto page 2
            sm.apply_command(submit(f"run-{i:04d}", task("H100:1"), at=10.0 + i))
        del sm.runs["run-0004"]  # one on the next page is forgotten (retention)
        second = (
            await c.get("/api/v1/runs", params={"limit": 4, "cursor": first["next_cursor"]})
        ).json()
    assert [r["name"] for r in first["runs"]] == ["run-0009", "run-0008", "run-0007", "run-0006"]
    assert [r["name"] for r in second["runs"]] == ["run-0005", "run-0003", "run-0002", "run-0001"]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 1001},
        {"limit": "x"},
        {"cursor": "not-a-cursor"},
        {"cursor": encode_cursor("nodes", (1.0, "n1"))},  # another list's
        {"cursor": "WyJydW5zIiwiTmFOIiwieCJd"},  # ["runs","NaN","x"]
    ],
)
async def test_bad_limits_and_cursors_are_422_problems(tmp_path: Path, params: dict) -> None:
    async with api(StubAgent(runs_world(3), tmp_path)) as c:
        r = await c.get("/api/v1/runs", params=params)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"


async def test_nodes_are_paginated_too(tmp_path: Path) -> None:
    sm = world(*(host(f"n{i}", 8, at=float(i)) for i in range(5)))
    async with api(StubAgent(sm, tmp_path, node_id="n3")) as c:
        pages = await walk(c, "/api/v1/nodes", "nodes", limit=2)
        doc = (await c.get("/api/v1/nodes")).json()
    assert [[n["name"] for n in p] for p in pages] == [["n4", "n3"], ["n2", "n1"], ["n0"]]
    assert doc["gossip"] == {"running": False} and doc["next_cursor"] is None
    here = next(n for n in doc["nodes"] if n["node_id"] == "n3")
    assert here["role"] == "leader" and len(here["telemetry"]) == 8


async def test_the_first_answer_stays_small_however_many_runs(tmp_path: Path) -> None:
    """6,000 queued runs answered 12 MB at once before pages; now a page, configs apart."""
    sm = runs_world(3000)
    async with api(StubAgent(sm, tmp_path)) as c:
        r = await c.get("/api/v1/runs")
    assert len(r.json()["runs"]) == 100
    assert len(r.content) < 100 * 1200, len(r.content)


# -- the client and the CLI ---------------------------------------------------------------------


class SyncASGI(httpx.BaseTransport):
    """The app behind the CLI's synchronous client: each request in a trio run of its own."""

    def __init__(self, app: Any) -> None:
        self.inner = httpx.ASGITransport(app=app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def one() -> httpx.Response:
            sent = httpx.Request(
                request.method, request.url, headers=request.headers, content=request.read()
            )
            r = await self.inner.handle_async_request(sent)
            return httpx.Response(r.status_code, headers=r.headers, content=await r.aread())

        return trio.run(one)


@pytest.fixture
def sync_client(tmp_path: Path) -> Iterator[tuple[Client, StateMachine]]:
    sm = runs_world(1300, finished=1150)  # 150 active, 1,150 finished
    app = create_app(StubAgent(sm, tmp_path))  # type: ignore[arg-type]
    with Client(Profile("http://node", TOKEN)) as c:
        c._http.close()
        c._http = httpx.Client(
            transport=SyncASGI(app),
            base_url="http://node",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        yield c, sm


def test_the_client_follows_cursors(sync_client: tuple[Client, StateMachine]) -> None:
    c, _ = sync_client
    assert len(c.runs()) == 150
    every = c.runs(all=True)
    assert len(every) == 1300 and len({r["name"] for r in every}) == 1300
    assert [r["name"] for r in c.runs(all=True, limit=1005)] == [r["name"] for r in every[:1005]]
    assert len(c.nodes()) == 3


def ps(monkeypatch: pytest.MonkeyPatch, c: Client, *args: str) -> list[str]:
    """``meshgpu ps ARGS`` against ``c``: the run names it printed, in order."""
    import contextlib

    import meshgpu.cli._runs as runs_cli
    from meshgpu.cli._app import app

    @contextlib.contextmanager
    def client(url: str | None) -> Iterator[Client]:
        yield c

    monkeypatch.setattr(runs_cli, "client", client)
    result = CliRunner().invoke(app, ["ps", *args])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()[1:]
    return [line.split()[0] for line in lines if line.startswith("run-")]


def test_ps_shows_active_runs_then_more_on_request(
    monkeypatch: pytest.MonkeyPatch, sync_client: tuple[Client, StateMachine]
) -> None:
    c, sm = sync_client
    active = [f"run-{i:04d}" for i in range(1299, 1149, -1)]
    assert ps(monkeypatch, c) == active[:100]  # the last 100 active runs
    assert ps(monkeypatch, c, "-n", "3") == ["run-1299", "run-1298", "run-1297"]
    assert ps(monkeypatch, c, "-n", "1200") == [f"run-{i:04d}" for i in range(1299, 99, -1)]
    assert len(ps(monkeypatch, c, "-a")) == 1300
    # Nothing active: the last finished run, as dstack shows it.
    for name in active:
        sm.apply_command(StopRun(at=6_000.0, run_name=name, abort=True))
    assert ps(monkeypatch, c) == ["run-1299"]
