"""What every request meets before a route: the bearer token (checked before any body is read,
scheme case-insensitive), body limits enforced while the body streams, 405 with ``Allow``, and
an OpenAPI document that says all of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute

from meshgpu.api import create_app
from meshgpu.api.app import MAX_JSON_BODY, PUBLIC_PATHS
from meshgpu.api.problems import bearer_token
from tests.api._stub import TOKEN, StubAgent, api
from tests.scheduler._world import host, world

CHUNK = 64 << 10


class Body(httpx.AsyncByteStream):
    """A chunked request body (no Content-Length) that counts what the server pulled."""

    def __init__(self, total: int, chunk: bytes = b"x" * CHUNK) -> None:
        self.total, self.chunk, self.pulled = total, chunk, 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self.pulled >= self.total:
            raise StopAsyncIteration
        self.pulled += len(self.chunk)
        return self.chunk


async def send(c: httpx.AsyncClient, method: str, path: str, body: Body) -> httpx.Response:
    """``body`` as it is, chunked (httpx would wrap it in a generator the test transport leaves
    unfinished when the server stops reading)."""
    headers = {**c.headers, "Transfer-Encoding": "chunked"}
    return await c.send(httpx.Request(method, c.base_url.join(path), headers=headers, stream=body))


def anonymous(agent: StubAgent, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(agent)),  # type: ignore[arg-type]
        base_url="http://node",
        headers=headers,
    )


@pytest.fixture
def agent(tmp_path: Path) -> StubAgent:
    return StubAgent(world(host("n1")), tmp_path)


@pytest.mark.parametrize("path", ["/api/v1/runs", "/api/v1/code", "/api/v1/offers"])
async def test_no_token_no_body_read(agent: StubAgent, path: str) -> None:
    """FastAPI parses a body before a route's dependencies run: the token is checked first,
    so an anonymous caller cannot make the node buffer anything."""
    body = Body(8 << 20)
    async with anonymous(agent) as c:
        r = await send(c, "POST", path, body)
    assert r.status_code == 401, r.text
    assert body.pulled == 0
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json() == {
        "type": "about:blank",
        "title": "unauthorized",
        "status": 401,
        "detail": "send Authorization: Bearer <token> (see ~/.meshgpu/client.toml)",
        "code": "unauthorized",
    }


async def test_a_chunked_body_is_cut_off_at_the_limit(agent: StubAgent) -> None:
    """No Content-Length: the limit holds as the chunks arrive, answered 413 when crossed."""
    body = Body(8 << 20)
    async with api(agent) as c:
        r = await send(c, "POST", "/api/v1/runs", body)
    assert r.status_code == 413, r.text
    assert r.json()["code"] == "too_large"
    assert body.pulled <= MAX_JSON_BODY + CHUNK


async def test_every_route_is_held_to_the_limit_public_ones_too(agent: StubAgent) -> None:
    async with anonymous(agent) as c:
        join = Body(8 << 20)
        r = await send(c, "POST", "/api/v1/join", join)
        assert r.status_code == 413 and join.pulled <= MAX_JSON_BODY + CHUNK
    async with api(agent) as c:
        # A route that never reads a body answers as ever; one that streams it (code archives,
        # a higher limit) is cut off at its own limit.
        assert (await send(c, "GET", "/api/v1/runs", Body(8 << 20))).status_code == 200
        code = Body(8 << 20)
        r = await send(c, "POST", "/api/v1/code", code)
        assert r.status_code == 413
        assert code.pulled <= agent.code.limit + (64 << 10) + CHUNK
        # A declared length over the limit is refused before a byte is read.
        declared = await c.post(
            "/api/v1/runs", content=b"{}", headers={"Content-Length": str(MAX_JSON_BODY + 1)}
        )
        assert declared.status_code == 413
    # Within the limit nothing changes.
    async with api(agent) as c:
        r = await send(c, "POST", "/api/v1/runs", Body(2 * CHUNK, b" " * CHUNK))
        assert r.status_code in (400, 422) and r.json()["title"] != "request too large"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_the_scheme_is_case_insensitive(agent: StubAgent, scheme: str) -> None:
    async with anonymous(agent, Authorization=f"{scheme} {TOKEN}") as c:
        assert (await c.get("/api/v1/runs")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200


@pytest.mark.parametrize(
    "header", ["", "Bearer", "Bearer ", f"Basic {TOKEN}", f"Bearer{TOKEN}", "Bearer wrong"]
)
async def test_anything_else_is_refused(agent: StubAgent, header: str) -> None:
    async with anonymous(agent, Authorization=header) as c:
        assert (await c.get("/api/v1/runs")).status_code == 401


def test_bearer_token() -> None:
    assert bearer_token("bearer abc") == "abc"
    assert bearer_token("  Bearer   abc  ") == "abc"
    assert bearer_token("Basic abc") == bearer_token("abc") == bearer_token("") == ""


async def test_public_paths_are_the_routes_without_a_token(agent: StubAgent) -> None:
    """The guard's public paths and the routes' ``auth`` dependency say the same thing (a route
    added without ``Auth`` is not silently public, nor documented as such)."""
    app = create_app(agent)

    def flat(routes: list) -> list[APIRoute]:  # type: ignore[type-arg]
        # routers included with include_router (fleets, offers, ...) hold their own routes
        out: list[APIRoute] = []
        for r in routes:
            if isinstance(r, APIRoute):
                out.append(r)
            elif hasattr(r, "original_router"):
                out += flat(r.original_router.routes)
        return out

    # The console's routes have their own guard (the sign-in cookie: tests/api/test_console.py).
    from meshgpu.api import ui

    routes = [r for r in flat(app.routes) if not ui.is_ui(r.path)]

    def authenticated(route: APIRoute) -> bool:
        return any(d.call.__name__ == "auth" for d in route.dependant.dependencies)

    assert {r.path for r in routes if not authenticated(r)} | {"/openapi.json"} == PUBLIC_PATHS
    async with anonymous(agent) as c:
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/openapi.json")).status_code == 200


async def test_405_names_every_method_of_the_path(agent: StubAgent) -> None:
    async with api(agent) as c:
        r = await c.delete("/api/v1/runs/x")
        listing = await c.put("/api/v1/runs")
    assert r.status_code == 405
    assert r.headers["content-type"] == "application/problem+json"
    assert set(r.headers["allow"].split(", ")) == {"GET", "PATCH"}
    assert set(listing.headers["allow"].split(", ")) == {"GET", "POST"}


async def test_openapi_documents_security_problems_and_media_types(agent: StubAgent) -> None:
    async with anonymous(agent) as c:
        doc = (await c.get("/openapi.json")).json()
    assert doc["components"]["securitySchemes"] == {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "The cluster's API token (~/.meshgpu/client.toml)",
        }
    }
    problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
    assert doc["components"]["schemas"]["Problem"]["required"] == [
        "type",
        "title",
        "status",
        "detail",
    ]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            answers = op["responses"]
            assert answers["413"]["content"] == {"application/problem+json": problem}
            if path in PUBLIC_PATHS:
                assert "security" not in op, (method, path)
            else:
                assert op["security"] == [{"bearer": []}], (method, path)
                assert answers["401"]["content"] == {"application/problem+json": problem}
            for status, answer in answers.items():
                if status >= "400":
                    assert answer["content"] == {"application/problem+json": problem}, (
                        method,
                        path,
                        status,
                    )
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    paths = doc["paths"]
    assert list(paths["/api/v1/runs/{name}/logs"]["get"]["responses"]["200"]["content"]) == [
        "text/plain"
    ]
    assert list(paths["/api/v1/code/{sha}"]["get"]["responses"]["200"]["content"]) == [
        "application/gzip"
    ]
    assert list(paths["/api/v1/code"]["post"]["requestBody"]["content"]) == ["application/gzip"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"])[0].startswith(
        "text/plain; version=0.0.4"
    )
    for status in ("404", "409", "503"):
        assert status in paths["/api/v1/runs/{name}"]["patch"]["responses"]
    assert paths["/api/v1/runs"]["get"]["responses"]["200"]["content"]["application/json"] == {
        "schema": {"$ref": "#/components/schemas/RunPage"}
    }
