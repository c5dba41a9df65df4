"""The nginx data plane against a real nginx driven by the agent's config generator and
supervisor, and real replicas (``_nginx_harness.py``)."""

from __future__ import annotations

import json
import os
import signal
from contextlib import aclosing
from pathlib import Path

import httpx
import trio

from meshgpu.services.nginx_conf import service_id
from tests.services._harness import HOSTS, websocket_echo
from tests.services._nginx_harness import NWorld, needs_nginx, nginx_world, wait_until

pytestmark = needs_nginx


async def raw_get(w: NWorld, target: str) -> tuple[int, bytes]:
    """A GET of ``target`` exactly as written (httpx would resolve dot segments)."""
    port = int(w.url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body[body.find(b"{") : body.rfind(b"}") + 1]


def client(w: NWorld, **kw: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=w.url, timeout=10, **kw)  # type: ignore[arg-type]


def upstream_conf(w: NWorld, name: str = "svc") -> bool:
    return f"upstream {service_id(w.state.runs[name].run_id)} " in w.plane.text


async def test_routing_strip_prefix_and_counting(tmp_path: Path) -> None:
    async with nginx_world(tmp_path) as w, client(w) as c:
        await w.up()
        await w.up("kept", nodes=("n2",), strip_prefix=False)
        assert upstream_conf(w) and upstream_conf(w, "kept")
        r = await c.get("/proxy/services/main/svc/a/b%2Fc?x=1&y=2")
        assert r.status_code == 200, r.text
        seen = r.json()
        assert seen["raw_path"] == "/a/b%2Fc"  # as the client sent it
        assert seen["query"] == "x=1&y=2"
        assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert seen["headers"]["x-forwarded-proto"] == "http"
        assert seen["headers"]["x-forwarded-host"].startswith("127.0.0.1:")
        assert "x-meshgpu-client" not in seen["headers"]
        r = await c.get("/proxy/services/main/kept/v1/x")
        assert r.json()["path"] == "/proxy/services/main/kept/v1/x"
        # Without the trailing slash: the agent answers (the embedded ingress forwards "/").
        r = await c.get("/proxy/services/main/svc")
        assert r.status_code == 200 and r.json()["path"] == "/"
        # The API still answers through nginx, with its own token check.
        assert (await c.get("/api/v1/runs")).status_code == 401
        assert (await c.get("/api/v1/runs", headers=w.headers())).status_code == 200
        assert (await c.get("/_meshgpu/nginx/auth?project=main")).status_code == 404
        run_id = w.state.runs["svc"].run_id
        # nginx counted 1 (its access log, flushed each second), the agent 1 (no slash).
        await wait_until(lambda: w.ingress.counters.snapshot().get(run_id) == (2, 0))
        r = await c.get("/metrics", headers=w.headers())
        assert (
            'meshgpu_service_requests_total{code="2xx",node="n0",project="main",service="svc"} 2.0'
            in r.text
        )


async def test_odd_paths_go_to_the_agent(tmp_path: Path) -> None:
    async with nginx_world(tmp_path) as w, client(w) as c:
        await w.up()
        await w.up("other", nodes=("n2",))
        # An encoded name, dot segments naming another service: the agent reads the raw path.
        r = await c.get("/proxy/services/main/%73vc/x")
        assert r.status_code == 400 and r.json()["code"] == "bad_request"
        status, body = await raw_get(w, "/proxy/services/main/other/../svc/x")
        assert status == 200 and json.loads(body)["raw_path"] == "/../svc/x"
        assert json.loads(body)["replica"] == "n2"  # other's replica, as the agent routes it
        r = await c.get("/proxy/services/main/nope/x")
        assert r.status_code == 404 and r.json()["code"] == "no_such_service"
        r = await c.get("/x", headers={"Host": "bad host"})
        assert r.status_code == 400


async def test_auth_request_cached(tmp_path: Path) -> None:
    async with nginx_world(tmp_path) as w, client(w) as c:
        await w.up(auth=True)
        r = await c.get("/proxy/services/main/svc/x")
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "unauthorized"
        r = await c.post("/proxy/services/main/svc/x", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        checks = []
        token_ok = w.ingress.token_ok
        w.ingress.token_ok = lambda t: checks.append(t) or token_ok(t)  # type: ignore[func-returns-value]
        for method in ("GET", "POST", "GET"):
            r = await c.request(method, "/proxy/services/main/svc/x", headers=w.headers())
            assert r.status_code == 200
        assert r.json()["headers"]["authorization"] == w.headers()["Authorization"]
        assert checks == ["test-token"]  # asked once, then nginx's cache answered
        run_id = w.state.runs["svc"].run_id
        await wait_until(lambda: w.ingress.counters.snapshot().get(run_id) == (3, 0))


async def test_rate_limit(tmp_path: Path) -> None:
    async with nginx_world(tmp_path) as w, client(w) as c:
        await w.up(
            rate_limits=[
                {"prefix": "/", "rps": 100},
                {"prefix": "/api", "rps": 1, "burst": 1},
                {"prefix": "/keyed", "rps": 0.5, "key": {"type": "header", "header": "x-user"}},
            ],
        )
        assert "rate=30r/m" in w.plane.text
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
        run_id = w.state.runs["svc"].run_id
        # Refused requests are not completed ones (the autoscaler's RPS), but /metrics shows them.
        await wait_until(lambda: w.ingress.counters.snapshot().get(run_id) == (5, 0))
        r = await c.get("/metrics", headers=w.headers())
        assert 'code="4xx",node="n0",project="main",service="svc"} 3.0' in r.text


async def test_sse_passes_incrementally(tmp_path: Path) -> None:
    async with nginx_world(tmp_path) as w, client(w) as c:
        await w.up()
        upstream = w.upstreams["n1"]
        async with c.stream("GET", "/proxy/services/main/svc/sse") as r:
            assert r.headers["content-type"] == "text/event-stream"
            async with aclosing(r.aiter_raw()) as events:
                for i in range(3):
                    with trio.fail_after(5):
                        assert await events.__anext__() == b"data: %d\n\n" % i
                    upstream.gate.set()
                assert [x async for x in events] == []


async def test_websocket(tmp_path: Path) -> None:
    async with nginx_world(tmp_path) as w:
        await w.up()
        await websocket_echo(w.url)


async def test_activation_falls_back_to_the_agent(tmp_path: Path) -> None:
    from tests.services._harness import place, submit

    async with nginx_world(tmp_path, activation_timeout_s=10) as w, client(w) as c:
        submit(w.state, "svc", w.port, auth=False)
        w.plane.notify()
        run_id = w.state.runs["svc"].run_id
        result: list[httpx.Response] = []

        async def request() -> None:
            result.append(await c.get("/proxy/services/main/svc/x"))

        async with trio.open_nursery() as n:
            n.start_soon(request)
            await wait_until(lambda: w.ingress.counters.snapshot().get(run_id, (0, 0))[1] == 1)
            assert not upstream_conf(w)  # no ready replica: nginx hands it to the agent
            jobs = place(w.state, "svc", ["n1"])
            before = w.plane.reloads
            w.ready(jobs[0])
        assert result[0].status_code == 200
        await w.reloaded(before)
        assert upstream_conf(w)
        assert (await c.get("/proxy/services/main/svc/y")).status_code == 200
        await wait_until(lambda: w.ingress.counters.snapshot().get(run_id) == (2, 0))


async def test_reload_on_readiness_and_drain(tmp_path: Path) -> None:
    async with nginx_world(tmp_path) as w, client(w) as c:
        jobs = await w.up(nodes=("n1", "n2"))
        seen = {(await c.get("/proxy/services/main/svc/x")).json()["replica"] for _ in range(8)}
        assert seen == {"n1", "n2"}
        text, reloads = w.plane.text, w.plane.reloads
        w.plane.notify()  # nothing changed: no reload
        await trio.sleep(0.3)
        assert w.plane.reloads == reloads and w.plane.text == text
        # n1 drains: dropped from the upstream; nginx closes its idle connections to it.
        w.ready(jobs[0], False)
        await w.reloaded(reloads)
        assert f"{HOSTS['n1']}:{w.port}" not in w.plane.text
        seen = {(await c.get("/proxy/services/main/svc/x")).json()["replica"] for _ in range(6)}
        assert seen == {"n2"}
        await wait_until(lambda: not established(HOSTS["n1"], w.port), timeout=10)
        # Nothing ready: the agent holds requests again (activation), nginx drops the upstream.
        before = w.plane.reloads
        w.ready(jobs[1], False)
        await w.reloaded(before)
        assert not upstream_conf(w)


def established(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port is established (the drain's check)."""
    want = f"{''.join(reversed(host.split('.'))) and _hex_ip(host)}:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[2] == want and parts[3] == "01":
                return True
    return False


def _hex_ip(host: str) -> str:
    return "".join(f"{int(b):02X}" for b in reversed(host.split(".")))


async def test_supervisor_restarts_nginx(tmp_path: Path) -> None:
    async with nginx_world(tmp_path) as w, client(w) as c:
        await w.up()
        assert (await c.get("/proxy/services/main/svc/x")).status_code == 200
        pid = w.plane._proc.pid  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: w.plane.starts == 2)
        # The port stayed bound by the agent: requests meanwhile waited in the backlog.
        async with client(w) as c2:
            assert (await c2.get("/proxy/services/main/svc/x")).status_code == 200
    assert not Path(f"/proc/{pid}").exists() or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


async def test_names_that_try_to_inject_config_are_harmless(tmp_path: Path) -> None:
    evil = "/a;} location / { return 200 pwned; } #"
    async with nginx_world(tmp_path) as w, client(w) as c:
        # A rate limit's prefix and header name are the run's text: not plain, so nginx does
        # not serve the service -- the agent does (limits and all).
        await w.up(native=False, rate_limits=[{"prefix": evil, "rps": 1}])
        await w.up(
            "hdr",
            nodes=("n2",),
            native=False,
            rate_limits=[{"prefix": "/", "rps": 1, "key": {"type": "header", "header": "x;a"}}],
        )
        assert "pwned" not in w.plane.text and "x;a" not in w.plane.text
        assert not upstream_conf(w) and not upstream_conf(w, "hdr")
        r = await c.get("/proxy/services/main/svc/x")
        assert r.status_code == 200 and r.json()["replica"] == "n1"
        status, body = await raw_get(w, evil.replace(" ", "%20").replace("#", "%23"))
        assert status == 401 and b"pwned" not in body  # the API's answer, no injected location
        # A name nginx would read as syntax never reaches the text either (meshgpu validates
        # run names; the generator checks again).
        route = w.ingress.routes.get("main", "svc")
        assert route is not None
        from dataclasses import replace

        from meshgpu.services.nginx_conf import native

        for bad in ("a;b", "a b", "a}", "a$b", "../x", "a%2Fb", 'a"b'):
            assert not native(replace(route, run_name=bad, service=replace(route.service)))
            assert not native(replace(route, project=bad))


async def test_host_routing(tmp_path: Path) -> None:
    async with nginx_world(tmp_path, domain="svc.example.com") as w, client(w) as c:
        await w.up(name="web")
        assert "server_name web.svc.example.com;" in w.plane.text
        r = await c.get("/hello?q=1", headers={"Host": "web.svc.example.com"})
        assert r.status_code == 200 and r.json()["path"] == "/hello"
        assert r.json()["query"] == "q=1"
        r = await c.get("/hello", headers={"Host": "WEB.svc.example.com:443"})
        assert r.json()["path"] == "/hello"
        # Not served by nginx: the agent's answer (it reads the Host itself).
        r = await c.get("/hello", headers={"Host": "nope.svc.example.com"})
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/problem+json"
        r = await c.get("/hello", headers={"Host": "a.b.svc.example.com"})
        assert r.status_code == 400


async def test_bodies_streamed_and_limited(tmp_path: Path) -> None:
    from tests.api.test_guard import CHUNK, Body
    from tests.services.test_ingress import send

    async with nginx_world(tmp_path) as w, client(w) as c:
        await w.up()
        r = await send(c, "/proxy/services/main/svc/upload", Body(8 * CHUNK))
        assert r.status_code == 200
        assert r.json()["body_len"] == 8 * CHUNK
        assert r.json()["chunks"] > 1  # streamed, not buffered whole
        r = await send(c, "/proxy/services/main/svc/upload", Body(65 << 20), length=65 << 20)
        assert r.status_code == 413
        assert r.json()["code"] == "too_large"
        assert (await c.get("/proxy/services/main/svc/after")).status_code == 200


async def test_drain_with_a_stream_held_elsewhere(tmp_path: Path) -> None:
    """A replica leaves while a long stream to the other one is still open (the old worker
    lives on for it): the idle keep-alive connections to the leaving one still close."""
    async with nginx_world(tmp_path) as w, client(w) as c:
        jobs = await w.up(nodes=("n1", "n2"))
        for _ in range(4):
            assert (await c.get("/proxy/services/main/svc/x")).status_code == 200
        assert established(HOSTS["n1"], w.port) and established(HOSTS["n2"], w.port)
        async with c.stream("GET", "/proxy/services/main/svc/sse") as r:
            held = next(n for n, u in w.upstreams.items() if u.seen[-1]["path"] == "/sse")
            other = "n1" if held == "n2" else "n2"
            async with aclosing(r.aiter_raw()) as events:
                with trio.fail_after(5):
                    assert await events.__anext__() == b"data: 0\n\n"
                before = w.plane.reloads
                w.ready(jobs[0] if other == "n1" else jobs[1], False)
                await w.reloaded(before)
                await wait_until(lambda: not established(HOSTS[other], w.port), timeout=10)
                for _ in range(2):
                    w.upstreams[held].gate.set()
                    with trio.fail_after(5):
                        assert (await events.__anext__()).startswith(b"data: ")
                    await trio.sleep(0.05)
                w.upstreams[held].gate.set()
                with trio.fail_after(5):
                    assert [x async for x in events] == []  # the stream ends whole


def test_stale_nginx_is_stopped(tmp_path: Path) -> None:
    """An nginx left running in the data dir (its agent crashed) is found by its pid file and
    stopped before the port is bound again; an unrelated process in a stale pid file is not."""
    import subprocess
    import time

    from meshgpu.services.nginx import NginxPlane, stop_stale
    from meshgpu.testing import free_port
    from tests.services._nginx_harness import NGINX

    prefix = tmp_path / "nginx"
    NginxPlane.prepare_dir(prefix)
    (prefix / "nginx.conf").write_text(
        f'daemon off; pid "{prefix}/nginx.pid"; error_log "{prefix}/error.log";\n'
        f"events {{}} http {{ access_log off; client_body_temp_path {prefix}/tmp;"
        f" proxy_temp_path {prefix}/tmp; fastcgi_temp_path {prefix}/tmp;"
        f" uwsgi_temp_path {prefix}/tmp; scgi_temp_path {prefix}/tmp;"
        f" server {{ listen 127.0.0.1:{free_port()}; }} }}\n"
    )
    proc = subprocess.Popen(
        [str(NGINX), "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not (prefix / "nginx.pid").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        NginxPlane.prepare_dir(prefix)
        assert proc.wait(timeout=5) is not None
        assert not (prefix / "nginx.pid").exists()
        (prefix / "nginx.pid").write_text(f"{os.getpid()}\n")  # not an nginx of ours
        assert not stop_stale(prefix)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
