"""The ingress over real sockets: the API app served by hypercorn with the ingress in front, a
state fed with real commands, and replicas that are real HTTP servers on their own loopback
addresses (see ``_harness.py``)."""

from __future__ import annotations

import json
import socket
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest
import trio

from tests.api.test_guard import CHUNK, Body
from tests.services._harness import (
    HOSTS,
    World,
    finish,
    place,
    ready,
    submit,
    websocket_echo,
    world,
)


async def send(
    c: httpx.AsyncClient, path: str, body: Body, length: int | None = None
) -> httpx.Response:
    """A chunked body (no Content-Length) unless ``length``, as the API's guard tests send."""
    framing = {"Content-Length": str(length)} if length else {"Transfer-Encoding": "chunked"}
    request = c.build_request("POST", path, headers=framing)
    request.stream = body
    return await c.send(request)


def client(w: World, **kw: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=w.url, timeout=10, **kw)  # type: ignore[arg-type]


async def up(
    w: World, name: str = "svc", nodes: tuple[str, ...] = ("n1",), **fields: object
) -> list[str]:
    fields.setdefault("auth", False)
    submit(w.state, name, w.port, replicas=len(nodes), **fields)
    jobs = place(w.state, name, list(nodes))
    for j in jobs:
        ready(w.state, w.ingress, j)
    return jobs


async def test_prefix_stripped_by_default(tmp_path: Path) -> None:
    async with world(tmp_path) as w, client(w) as c:
        await up(w)
        r = await c.get("/proxy/services/main/svc/a/b%2Fc?x=1&y=2")
        assert r.status_code == 200, r.text
        seen = r.json()
        assert seen["raw_path"] == "/a/b%2Fc"
        assert seen["query"] == "x=1&y=2"
        assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert seen["headers"]["x-forwarded-proto"] == "http"
        assert seen["headers"]["x-forwarded-host"].startswith("127.0.0.1:")
        r = await c.get("/proxy/services/main/svc")
        assert r.json()["path"] == "/"
        run_id = w.state.runs["svc"].run_id
        await wait_until(lambda: w.ingress.counters.snapshot().get(run_id) == (2, 0))


async def test_prefix_kept_when_strip_prefix_false(tmp_path: Path) -> None:
    async with world(tmp_path) as w, client(w) as c:
        await up(w, strip_prefix=False)
        r = await c.get("/proxy/services/main/svc/v1/x")
        assert r.json()["path"] == "/proxy/services/main/svc/v1/x"


async def test_host_routing(tmp_path: Path) -> None:
    async with world(tmp_path, domain="svc.example.com") as w, client(w) as c:
        await up(w, name="web")
        r = await c.get("/hello", headers={"Host": "web.svc.example.com"})
        assert r.status_code == 200
        assert r.json()["path"] == "/hello"
        r = await c.get("/hello", headers={"Host": "WEB.svc.example.com:443"})
        assert r.json()["path"] == "/hello"
        r = await c.get("/hello", headers={"Host": "nope.svc.example.com"})
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/problem+json"
        for bad in ("a.b.svc.example.com", "we b.svc.example.com", "x/y", "a..b"):
            r = await c.get("/hello", headers={"Host": bad})
            assert r.status_code == 400, (bad, r.status_code)
            assert r.json()["status"] == 400
        # Another host name: the API as usual (healthz is public).
        r = await c.get("/healthz", headers={"Host": "other.example.org"})
        assert r.status_code == 200


async def test_unknown_and_bad_paths(tmp_path: Path) -> None:
    async with world(tmp_path) as w, client(w) as c:
        await up(w)
        cases = {
            "/proxy/services/main/nope/": 404,
            "/proxy/services/other/svc/": 404,
            "/proxy/services/main/": 400,
            "/proxy/services//svc/": 400,
            "/proxy/services/main/sv%2Fc/x": 400,
            "/proxy/services/ma%2Fin/svc/x": 400,
            "/proxy/services/main/%2e%2e/x": 400,
            "/proxy/whatever": 404,
        }
        for path, status in cases.items():
            r = await c.get(path)
            assert r.status_code == status, (path, r.status_code, r.text)
            assert r.json()["status"] == status
        # Raw paths httpx would normalise, sent as they are.
        for raw in (
            b"/proxy/services/main/../svc/",
            b"/proxy/services/main/..",
            b"/proxy/services/main/../../api/v1/runs",
            b"/proxy/services/main/svc%00/",
            b"/proxy/services/main/svc/../..",  # the run is named: the rest is the app's
        ):
            status = await raw_status(w, raw)
            assert status == (200 if raw.endswith(b"/../..") else 400), raw
        r = await c.get("/proxy/services/main/svc/ok")
        assert r.status_code == 200


async def raw_status(w: World, path: bytes, host: bytes = b"x") -> int:
    port = int(w.url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        data = b""
        while b"\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


async def test_auth(tmp_path: Path) -> None:
    async with world(tmp_path) as w, client(w) as c:
        await up(w, auth=True)
        r = await c.get("/proxy/services/main/svc/x")
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["code"] == "unauthorized"
        r = await c.get("/proxy/services/main/svc/x", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await c.get("/proxy/services/main/svc/x", headers=w.headers())
        assert r.status_code == 200
        # The client's Authorization is forwarded (dstack does too).
        assert r.json()["headers"]["authorization"] == w.headers()["Authorization"]
        # The API itself still takes its token.
        assert (await c.get("/api/v1/runs")).status_code == 401


async def test_request_bodies_streamed_and_limited(tmp_path: Path) -> None:
    async with world(tmp_path, body_limit=1 << 20) as w, client(w) as c:
        await up(w)

        def chunks(n: int) -> Body:
            return Body(n * CHUNK)

        r = await send(c, "/proxy/services/main/svc/upload", chunks(8))
        assert r.status_code == 200
        assert r.json()["body_len"] == 8 * CHUNK
        assert r.json()["chunks"] > 1  # it arrived in pieces, not buffered whole
        r = await c.post("/proxy/services/main/svc/upload", content=b"y" * 1000)
        assert r.json()["body_len"] == 1000
        # Over the limit: declared, then discovered while streaming.
        r = await send(c, "/proxy/services/main/svc/upload", Body(2 << 20), length=2 << 20)
        assert r.status_code == 413
        r = await send(c, "/proxy/services/main/svc/upload", chunks(20))
        assert r.status_code == 413
        assert r.json()["code"] == "too_large"
        r = await c.get("/proxy/services/main/svc/after")
        assert r.status_code == 200


async def test_sse_arrives_as_it_is_written(tmp_path: Path) -> None:
    async with world(tmp_path) as w, client(w) as c:
        await up(w)
        upstream = w.upstreams["n1"]
        async with c.stream("GET", "/proxy/services/main/svc/sse") as r:
            assert r.headers["content-type"] == "text/event-stream"
            async with aclosing(r.aiter_raw()) as events:
                for i in range(3):
                    with trio.fail_after(5):
                        assert await events.__anext__() == b"data: %d\n\n" % i
                    upstream.gate.set()  # the next event is written only now
                assert [x async for x in events] == []  # then the end


async def test_balances_across_replicas(tmp_path: Path) -> None:
    async with world(tmp_path) as w, client(w) as c:
        await up(w, nodes=("n1", "n2"))
        seen = [(await c.get("/proxy/services/main/svc/x")).json()["replica"] for _ in range(10)]
        assert seen.count("n1") == 5 and seen.count("n2") == 5
        # Fewest outstanding: with a request held on one replica, the rest go to the other.
        async with trio.open_nursery() as n:
            n.start_soon(c.get, "/proxy/services/main/svc/slow")
            await wait_until(
                lambda: any(
                    s["path"].endswith("/slow") for u in w.upstreams.values() for s in u.seen
                )
            )
            busy = next(
                u for u in w.upstreams.values() if any(s["path"].endswith("/slow") for s in u.seen)
            )
            free = ({"n1", "n2"} - {busy.name}).pop()
            for _ in range(4):
                assert (await c.get("/proxy/services/main/svc/y")).json()["replica"] == free
            busy.gate.set()


async def wait_until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def test_connection_refused_retried_on_another_replica(tmp_path: Path) -> None:
    async with world(tmp_path) as w, client(w) as c:
        await up(w, nodes=("n1", "n2"))
        w.stops["n2"].cancel()  # n2's app is gone, its job still looks ready
        await wait_until(lambda: _refuses(HOSTS["n2"], w.port))
        for _ in range(6):
            r = await c.get("/proxy/services/main/svc/x")
            assert r.status_code == 200
            assert r.json()["replica"] == "n1"
        w.stops["n1"].cancel()
        await wait_until(lambda: _refuses(HOSTS["n1"], w.port))
        r = await c.get("/proxy/services/main/svc/x")
        assert r.status_code == 502
        assert "refused" in r.json()["detail"]


def _refuses(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return True
    return False


async def test_replica_dying_mid_stream(tmp_path: Path) -> None:
    async with world(tmp_path) as w, client(w) as c:
        await up(w)
        with pytest.raises(httpx.RemoteProtocolError):
            async with c.stream("GET", "/proxy/services/main/svc/die") as r:
                assert r.status_code == 200
                async for _ in r.aiter_raw():
                    pass
        r = await c.get("/proxy/services/main/svc/still-up")
        assert r.status_code == 200


async def test_rate_limit(tmp_path: Path) -> None:
    async with world(tmp_path) as w, client(w) as c:
        await up(
            w,
            rate_limits=[
                {"prefix": "/", "rps": 100},
                {"prefix": "/api", "rps": 1, "burst": 1},
                {"prefix": "/keyed", "rps": 1, "key": {"type": "header", "header": "x-user"}},
            ],
        )
        codes = [(await c.get("/proxy/services/main/svc/api/x")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = await c.get("/proxy/services/main/svc/api/x")
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["code"] == "rate_limited"
        assert (await c.get("/proxy/services/main/svc/other")).status_code == 200
        a = [
            (await c.get("/proxy/services/main/svc/keyed", headers={"x-user": "a"})).status_code
            for _ in range(2)
        ]
        b = (await c.get("/proxy/services/main/svc/keyed", headers={"x-user": "b"})).status_code
        assert a == [200, 429] and b == 200


async def test_activation_holds_then_serves(tmp_path: Path) -> None:
    async with world(tmp_path, activation_timeout_s=10) as w, client(w) as c:
        submit(w.state, "svc", w.port, auth=False)
        run_id = w.state.runs["svc"].run_id
        result: list[httpx.Response] = []

        async def request() -> None:
            result.append(await c.get("/proxy/services/main/svc/x"))

        async with trio.open_nursery() as n:
            n.start_soon(request)
            await wait_until(lambda: w.ingress.counters.snapshot().get(run_id, (0, 0))[1] == 1)
            jobs = place(w.state, "svc", ["n1"])
            await trio.sleep(0.1)
            assert not result  # RUNNING but not ready: still held
            ready(w.state, w.ingress, jobs[0])
        assert result[0].status_code == 200
        await wait_until(lambda: w.ingress.counters.snapshot().get(run_id) == (1, 0))


async def test_activation_times_out(tmp_path: Path) -> None:
    async with world(tmp_path, activation_timeout_s=0.3, max_waiting=2) as w, client(w) as c:
        submit(w.state, "svc", w.port, auth=False)
        codes: list[int] = []

        async def request() -> None:
            codes.append((await c.get("/proxy/services/main/svc/x")).status_code)

        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(request)
        assert sorted(codes) == [503, 504, 504]
        run_id = w.state.runs["svc"].run_id
        await wait_until(lambda: w.ingress.counters.snapshot().get(run_id, (0, 0))[1] == 0)


async def test_finished_service(tmp_path: Path) -> None:
    """A stopped service answers at once (503 while it stops, 404 once it has finished); a
    replica that exits by itself leaves the service running (its requests wait)."""
    from meshgpu.state import StopRun
    from tests.state.test_state import apply

    async with world(tmp_path) as w, client(w) as c:
        jobs = await up(w)
        apply(w.state, StopRun(at=8.0, run_name="svc"))
        w.ingress.notify()
        r = await c.get("/proxy/services/main/svc/x")
        assert r.status_code == 503, r.text
        finish(w.state, jobs[0])
        assert w.state.runs["svc"].status.is_finished()
        w.ingress.notify()
        r = await c.get("/proxy/services/main/svc/x")
        assert r.status_code == 404, r.text


async def test_idle_connections_dropped_when_replica_leaves(tmp_path: Path) -> None:
    async with world(tmp_path) as w, client(w) as c:
        jobs = await up(w)
        assert (await c.get("/proxy/services/main/svc/x")).status_code == 200
        address = (HOSTS["n1"], w.port)
        await wait_until(lambda: bool(w.ingress.pool.replicas[address].idle))
        ready(w.state, w.ingress, jobs[0], False)  # draining: no more traffic
        await wait_until(lambda: address not in w.ingress.pool.replicas)


async def test_websocket_echo(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await up(w)
        await websocket_echo(w.url)


async def test_metrics(tmp_path: Path) -> None:
    async with world(tmp_path) as w, client(w) as c:
        await up(w)
        await c.get("/proxy/services/main/svc/x")
        await c.get("/proxy/services/main/nope/x")
        families = w.ingress.metric_families("n0")
        text = "\n".join(str(f.samples) for f in families)
        assert "code': '2xx'" in text
        assert "meshgpu_service_request_duration_seconds_bucket" in text
        r = await c.get("/metrics", headers=w.headers())
        assert r.status_code == 200
        assert (
            'meshgpu_service_requests_total{code="2xx",node="n0",project="main",service="svc"} 1.0'
            in r.text
        )


def test_json() -> None:
    assert json.loads("{}") == {}
