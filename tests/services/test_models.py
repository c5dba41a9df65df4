"""The OpenAI-compatible model endpoint, driven by the real ``openai`` client against a tiny
OpenAI-compatible replica (``_harness.Upstream``)."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.api._stub import TOKEN
from tests.services._harness import World, place, ready, submit, world


async def serve_model(w: World, name: str = "llm", auth: bool = True) -> None:
    submit(w.state, name, w.port, auth=auth, model={"name": "tiny-chat"})
    for j in place(w.state, name, ["n1"]):
        ready(w.state, w.ingress, j)


# The openai client leaves its SSE generators to the garbage collector once it has read
# "[DONE]" (trio reports that as a ResourceWarning): its own hygiene, not the ingress's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_openai_client_streamed_chat(tmp_path: Path) -> None:
    async with world(tmp_path, replicas=("n1",)) as w:
        await serve_model(w)
        client = openai.AsyncOpenAI(base_url=f"{w.url}/proxy/models/main", api_key=TOKEN)
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny-chat"]
        stream = await client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async with stream:
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == "Hello from n1"
        reply = await client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "Hello from n1"
        assert w.upstreams["n1"].seen[-1]["path"] == "/v1/chat/completions"
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "hi"}]
            )
        anonymous = openai.AsyncOpenAI(base_url=f"{w.url}/proxy/models/main", api_key="wrong")
        with pytest.raises(openai.AuthenticationError):
            await anonymous.chat.completions.create(
                model="tiny-chat", messages=[{"role": "user", "content": "hi"}]
            )
        assert (await anonymous.models.list()).data == []  # auth: true models hidden
        await client.close()
        await anonymous.close()


async def test_bad_model_requests(tmp_path: Path) -> None:
    async with world(tmp_path, replicas=("n1",)) as w:
        await serve_model(w, auth=False)
        async with httpx.AsyncClient(base_url=w.url) as c:
            base = "/proxy/models/main"
            r = await c.post(f"{base}/chat/completions", content=b"not json")
            assert r.status_code == 400 and r.json()["error"]["param"] == "model"
            r = await c.post(f"{base}/chat/completions", json={"messages": []})
            assert r.status_code == 400
            r = await c.get(f"{base}/chat/completions")
            assert r.status_code == 404
            r = await c.get("/proxy/models/ma%2Fin/models")
            assert r.status_code == 400
            r = await c.get("/proxy/models/other/models")
            assert r.json() == {"object": "list", "data": []}
            r = await c.post(f"{base}/embeddings", json={"model": "tiny-chat", "input": "x"})
            assert r.status_code == 200 and r.json()["path"] == "/v1/embeddings"


def test_tgi_format_refused_with_its_location() -> None:
    from meshgpu.config import ConfigError, parse_config

    text = "type: service\nport: 80\ncommands: [x]\nmodel:\n  name: m\n  format: tgi\n"
    with pytest.raises(ConfigError) as e:
        parse_config(text, "svc.yml")
    (issue,) = e.value.issues
    assert (issue.file, issue.line, issue.col, issue.path) == ("svc.yml", 6, 3, "model.format")
    assert "format: openai" in issue.message
