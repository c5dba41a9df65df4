"""The service examples (examples/service-openai, examples/service-http): their configurations
load with meshgpu's own loader as the services they claim to be, and their servers (standard
library only, run here as the job would run them: ``python3 server.py`` in the example's
directory) answer what a client and meshgpu's probes send -- the OpenAI server driven by the
real ``openai`` client, streaming included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import trio

from meshgpu.config import load_config
from meshgpu.config.render import to_json
from meshgpu.config.spec import compile_run
from meshgpu.testing import free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
OPENAI = EXAMPLES / "service-openai"
HTTP = EXAMPLES / "service-http"
MODEL = "meshgpu/echo-small"


def _spec(path: Path):
    return compile_run(to_json(load_config(path)))


def test_openai_example_config_is_a_model_service() -> None:
    spec = _spec(OPENAI / "service.dstack.yml")
    assert spec.type == "service"
    svc = spec.service
    assert svc is not None and svc.port == 8000 and svc.auth
    assert svc.model is not None and svc.model.name == MODEL and svc.model.prefix == "/v1"
    # No probes configured: dstack's default model probe (a one-token chat completion).
    assert not svc.probes_configured and svc.probes[0].url == "/v1/chat/completions"
    assert [(g.min, g.max) for g in svc.groups] == [(2, 2)]
    assert len(spec.jobs) == 2 and spec.jobs[0].commands == ("python3 server.py",)
    assert spec.host_ports == (8000,)


def test_http_example_config_scales_from_zero() -> None:
    spec = _spec(HTTP / "service.dstack.yml")
    svc = spec.service
    assert svc is not None and svc.port == 8000 and not svc.auth and svc.model is None
    (group,) = svc.groups
    assert (group.min, group.max) == (0, 2)
    assert group.scaling is not None and group.scaling.target == 5
    assert group.scaling.scale_up_delay_s == 30 and group.scaling.scale_down_delay_s == 300
    (probe,) = svc.probes
    assert probe.url == "/health" and probe.interval_s == 2


def _serve(directory: Path, **env: str) -> Iterator[str]:
    """``python3 server.py`` in ``directory`` on a free port; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "server.py"],
        cwd=directory,
        env=dict(os.environ) | {"PORT": str(port)} | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise RuntimeError(f"{directory.name}/server.py did not start:\n{out}")
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            assert proc.wait(10) == 0  # SIGTERM: a clean shutdown
        finally:
            proc.kill()
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture
def openai_server() -> Iterator[str]:
    yield from _serve(OPENAI, TOKEN_DELAY="0.001")


@pytest.fixture
def http_server() -> Iterator[str]:
    yield from _serve(HTTP, MESHGPU_REPLICA_NUM="1")


def test_openai_client_against_the_example(openai_server: str) -> None:
    client = openai.OpenAI(base_url=f"{openai_server}/v1", api_key="unused", max_retries=0)
    try:
        assert [m.id for m in client.models.list()] == [MODEL]

        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello mesh"}]
        )
        assert reply.choices[0].message.content == "Echo: hello mesh"
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None and reply.usage.completion_tokens == 3

        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "one two three"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage = [], None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
        assert pieces == ["Echo:", " one", " two", " three", " Echo:", " one"]
        assert finish == "length" and usage is not None and usage.completion_tokens == 6

        text = client.completions.create(model=MODEL, prompt="a b c", max_tokens=2)
        assert text.choices[0].text == "Echo: a"
        streamed = client.completions.create(model=MODEL, prompt="x", max_tokens=3, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == "Echo: x Echo:"

        # The client asks for base64 by default and decodes it; floats when asked.
        emb = client.embeddings.create(model=MODEL, input=["alpha", "beta"])
        a, b = (d.embedding for d in emb.data)
        assert len(a) == 64 and abs(sum(v * v for v in a) - 1) < 1e-4 and a != b
        again = client.embeddings.create(model=MODEL, input="alpha", encoding_format="float")
        assert again.data[0].embedding == pytest.approx(a, abs=1e-6)

        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        client.close()


def test_openai_example_wire_format_and_keep_alive(openai_server: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with httpx.Client(base_url=openai_server, timeout=10) as c:
        with c.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/event-stream"
            assert r.headers["transfer-encoding"] == "chunked"
            lines = [line for line in r.iter_lines() if line]
        assert all(line.startswith("data: ") for line in lines)
        assert lines[-1] == "data: [DONE]"
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in lines[:-1]]
        assert "".join(d.get("content", "") for d in deltas) == "Echo: hi Echo:"
        # The same connection serves the next request (HTTP/1.1 keep-alive after a stream).
        r = c.get("/v1/models")
        assert r.status_code == 200 and r.headers.get("connection") != "close"
        assert c.post("/v1/chat/completions", content=b"{nope").status_code == 400
        assert c.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        assert c.get("/nowhere").json()["error"]["code"] == "not_found"
        # A chunked request body (as a streaming proxy may forward one).
        chunked = c.post(
            "/v1/chat/completions",
            content=iter([json.dumps(body).encode()[:10], json.dumps(body).encode()[10:]]),
        )
        assert chunked.json()["choices"][0]["message"]["content"] == "Echo: hi Echo:"


def test_openai_example_passes_the_default_model_probe(openai_server: str) -> None:
    (probe,) = _spec(OPENAI / "service.dstack.yml").service.probes
    r = httpx.request(
        probe.method.upper(),
        openai_server + probe.url,
        headers=dict(probe.headers),
        content=probe.body,
        timeout=probe.timeout_s,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


async def test_openai_example_holds_many_streams(openai_server: str) -> None:
    """Many concurrent slow streams: each gets every token (a thread per connection)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 20,
        "stream": True,
    }
    done = []
    async with httpx.AsyncClient(
        base_url=openai_server, timeout=30, limits=httpx.Limits(max_connections=None)
    ) as c:

        async def one() -> None:
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            done.append(len(events))

        async with trio.open_nursery() as n:
            for _ in range(100):
                n.start_soon(one)
    assert done == [23] * 100  # role chunk, 20 tokens, the finish chunk, [DONE]


def test_http_example_answers(http_server: str) -> None:
    with httpx.Client(base_url=http_server, timeout=10) as c:
        assert c.get("/").text.startswith("hello from replica 1 on ")
        assert c.get("/health").status_code == 200
        assert c.get("/work", params={"ms": 1}).text == "worked 1 ms on replica 1\n"
        assert c.get("/work", params={"ms": "x"}).status_code == 400
        assert c.get("/missing").status_code == 404


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_openai_example_through_an_agent(tmp_path: Path) -> None:
    """The example as written (one replica, a free port), applied to a real agent: the real
    ``openai`` client streams a chat completion from the model endpoint of the agent, and the
    service path answers with a token and refuses without one."""
    from meshgpu.client import make_archive
    from meshgpu.testing import AgentProcess

    port = free_port()
    config = (OPENAI / "service.dstack.yml").read_text()
    assert "port: 8000\n" in config and "replicas: 2\n" in config
    config = config.replace("port: 8000\n", f"port: {port}\n").replace(
        "replicas: 2\n", "replicas: 1\n"
    )
    agent = AgentProcess(tmp_path, "a")
    try:
        agent.start()
        c = agent.client()
        data, sha = make_archive(OPENAI)
        c.upload_code(data, sha)
        name = c.submit(config, code_sha256=sha)["name"]
        http = httpx.Client(verify=agent.verify, timeout=10)
        client = openai.OpenAI(
            base_url=f"{agent.url}/proxy/models/main",
            api_key=agent.token,
            http_client=http,
            max_retries=0,
        )
        deadline = time.monotonic() + 60
        while True:  # ready once the default model probe has passed
            try:
                if [m.id for m in client.models.list()] == [MODEL]:
                    reply = client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
                    )
                    if reply.choices[0].message.content == "Echo: hi":
                        break
            except openai.APIError:
                pass
            assert time.monotonic() < deadline, f"{name} never served:\n{agent.log_tail()}"
            time.sleep(0.2)
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "through the mesh"}],
            stream=True,
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert text == "Echo: through the mesh"
        svc = f"{agent.url}/proxy/services/main/{name}"
        auth = {"Authorization": f"Bearer {agent.token}"}
        assert http.get(f"{svc}/health", headers=auth).json()["model"] == MODEL
        assert http.get(f"{svc}/health").status_code == 401
        client.close()
    finally:
        agent.close()
