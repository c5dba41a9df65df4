"""Hostile configurations posted to a live agent: a YAML alias bomb is refused quickly (400) while
the agent keeps answering /healthz within a second, a lone surrogate is a 400 (not a 500), and an
environment a process could not be started with is refused when submitted, not at exec."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from meshgpu.testing import AgentProcess


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    a = AgentProcess(tmp_path_factory.mktemp("bomb"), "bomb")
    a.start()
    yield a
    a.stop()
    a.kill_jobs()


def bomb(levels: int, width: int = 9) -> str:
    """A few hundred bytes that expand to ``width ** levels`` scalars. Six levels (531 441) keep
    an unbounded parser busy for seconds without exhausting the machine's memory."""
    lines = ["type: task", "commands: [x]", "a0: &a0 [" + ",".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def submission(config: str, **extra: Any) -> dict[str, Any]:
    return {"config": config, "request_id": uuid.uuid4().hex, **extra}


def auth(agent: AgentProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {agent.token}"}


async def test_alias_bombs_are_refused_quickly_while_healthz_answers(agent: AgentProcess) -> None:
    latencies: list[float] = []
    answers: list[tuple[httpx.Response, float]] = []
    async with httpx.AsyncClient(verify=agent.verify, timeout=60) as c:
        assert (await c.get(f"{agent.url}/healthz")).json()["ok"] is True
        done = trio.Event()

        async def poll_health() -> None:
            while not done.is_set():
                t = time.monotonic()
                r = await c.get(f"{agent.url}/healthz", timeout=5)
                latencies.append(time.monotonic() - t)
                assert r.status_code == 200
                await trio.sleep(0.02)

        async def post(path: str, body: dict[str, Any]) -> None:
            t = time.monotonic()
            r = await c.post(f"{agent.url}{path}", json=body, headers=auth(agent))
            answers.append((r, time.monotonic() - t))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll_health)
            await trio.sleep(0.1)
            async with trio.open_nursery() as posts:
                for _ in range(3):
                    posts.start_soon(post, "/api/v1/runs", submission(bomb(6)))
                posts.start_soon(post, "/api/v1/offers", {"config": bomb(6)})
            await trio.sleep(0.2)
            done.set()

    for r, elapsed in answers:
        assert r.status_code in (400, 422), r.text  # offers answer 422 for a bad configuration
        doc = r.json()
        assert doc["code"] == "invalid_config"
        assert doc["issues"][0]["message"] == (
            "YAML aliases expand to more than 50000 nodes: write the values out or use fewer "
            "anchors"
        )
        assert (doc["issues"][0]["line"], doc["issues"][0]["col"]) == (7, 30)
        assert elapsed < 2.0
    assert [r.status_code for r, _ in answers].count(400) == 3
    assert len(latencies) >= 5 and max(latencies) < 1.0, latencies


def raw_post(agent: AgentProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    # json.dumps escapes a lone surrogate as \ud800 (httpx's own encoder would refuse it).
    return httpx.post(
        f"{agent.url}{path}",
        content=json.dumps(body).encode(),
        headers=auth(agent) | {"Content-Type": "application/json"},
        verify=agent.verify,
        timeout=30,
    )


def test_a_lone_surrogate_in_a_configuration_is_a_400(agent: AgentProcess) -> None:
    r = raw_post(agent, "/api/v1/runs", submission("\ud800"))
    assert r.status_code == 400, r.text
    issue = r.json()["issues"][0]
    assert (issue["line"], issue["col"]) == (1, 1)
    assert "lone UTF-16 surrogate" in issue["message"]
    r = raw_post(agent, "/api/v1/runs", submission('type: task\ncommands: ["echo \ud83d"]\n'))
    assert r.status_code == 400, r.text
    assert r.json()["issues"][0]["col"] == 18
    # In the file name (echoed in every issue) and the other strings of a submission.
    for extra in ({"filename": "\udc80.yml"}, {"name": "a\ud800"}, {"run_args": ["\ud800"]}):
        r = raw_post(agent, "/api/v1/runs", submission("type: task\ncommands: [x]\n", **extra))
        assert r.status_code == 422, r.text
        assert "is a lone UTF-16 surrogate (U+D" in r.json()["detail"]
    r = raw_post(agent, "/api/v1/offers", {"config": "type: nope\n", "filename": "\udc80.yml"})
    assert r.status_code == 422, r.text
    assert r.json()["issues"][0]["file"] == "\\udc80.yml"
    # In a mapping posted for offers (JSON text, so YAML reads an escape it cannot decode).
    r = raw_post(agent, "/api/v1/offers", {"config": {"type": "task", "commands": ["\ud800"]}})
    assert r.status_code == 422, r.text


def test_an_environment_too_large_to_exec_is_refused_at_submission(
    agent: AgentProcess, tmp_path: Path
) -> None:
    big = "v" * 200_000
    r = raw_post(
        agent, "/api/v1/runs", submission(f"type: task\ncommands: [env]\nenv:\n  BIG: {big}\n")
    )
    assert r.status_code == 400, r.text[:2000]
    issue = r.json()["issues"][0]
    assert (issue["line"], issue["col"], issue["path"]) == (4, 3, "env.BIG")
    assert issue["message"].startswith(
        "env BIG: the variable is 200005 bytes (BIG=VALUE), over Linux's 131072-byte limit"
    )
    # The same value as an override (meshgpu apply -e BIG=...): the request is invalid.
    r = raw_post(
        agent, "/api/v1/runs", submission("type: task\ncommands: [env]\n", env={"BIG": big})
    )
    assert r.status_code == 422, r.text[:2000]
    assert "env BIG: the variable is 200005 bytes" in r.json()["detail"]
    r = raw_post(
        agent, "/api/v1/runs", submission("type: task\ncommands: [env]\n", env={"A": "\ud800"})
    )
    assert r.status_code == 422, r.text[:2000]
    assert "lone UTF-16 surrogate" in r.json()["detail"]
    assert httpx.get(f"{agent.url}/healthz", verify=agent.verify).json()["ok"] is True


def test_deeply_nested_input_is_a_client_error(agent: AgentProcess) -> None:
    deep = "[" * 3000 + "]" * 3000
    r = httpx.get(
        f"{agent.url}/api/v1/offers",
        params={"resources": deep},
        headers=auth(agent),
        verify=agent.verify,
        timeout=30,
    )
    assert r.status_code == 422, r.text[:2000]  # was a RecursionError: 500
    r = httpx.get(
        f"{agent.url}/api/v1/offers",
        params={"resources": '{"gpu": ' + "[" * 100 + "]" * 100 + "}"},
        headers=auth(agent),
        verify=agent.verify,
        timeout=30,
    )
    assert r.status_code == 422, r.text[:2000]
    assert "nested more than 64 levels deep" in r.text
    r = raw_post(agent, "/api/v1/runs", submission("type: task\nx: " + "[" * 900 + "]" * 900))
    assert r.status_code == 400, r.text[:2000]
    assert r.json()["issues"][0]["message"] == (
        "nested more than 64 levels deep: flatten the structure"
    )
