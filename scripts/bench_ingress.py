"""scripts/bench ingress: one agent's service ingress against the same load sent straight to the
replica and through nginx as a reverse proxy, in the same run.

One agent (separate process, fake GPUs, ``--api-tls off`` so the comparison with plain-HTTP
nginx is like for like) runs two services, each one replica on this host:

- ``fast``: nginx (one worker) answering every request with 1 KiB, so the replica is not the
  bottleneck. With ``wrk``, 64 keep-alive connections for ``--duration`` seconds each:
  (a) straight to the replica, (b) through a separate nginx reverse proxy (one worker, upstream
  keep-alive), (c) through the agent's ingress at ``/proxy/services/main/<run>/``. Added latency:
  p50/p99 at low load (``wrk -c1``: one request at a time), ingress minus direct.
- ``sse``: examples/service-openai (the standard-library OpenAI server), streaming chat
  completions of ``--sse-tokens`` tokens over ``--sse-hold`` seconds. ``--sse-streams``
  concurrent streams (default 1,000) are opened straight to the replica and then through the
  ingress and held to the end; ``sse_streams_held`` counts ingress streams that delivered every
  event. Time to first event, ingress minus direct, from sequential streams at low load.

Both data planes in the same run (``--data-planes``, default both): the embedded ingress of
the first agent and, through a second agent started with ``--data-plane nginx`` (one nginx
worker) that joins the mesh, nginx driven by the agent. ``ingress_rps``, the added latencies
and the SSE figures are the nginx data plane's when it ran; the embedded ones are also under
``ingress_embedded_rps`` and ``*_embedded`` keys.

With ``--https`` (default on) a third agent with the API over TLS joins the mesh and the same
throughput run goes through its ingress (``ingress_https_rps``). The agent's CPU time per
proxied request (``ingress_cpu_us_per_req``) says what a request costs the agent.

wrk and nginx come from ``apt-get install wrk nginx-light`` when missing and run as root.
Until the ingress is there, the ingress figures are ``null`` and ``ingress_error`` says why: the
direct and nginx figures still come. The whole bench is bounded (``--budget`` seconds) and stops
every process it started. The last line is JSON with the keys in INTERFACE.md (and a few more).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from meshgpu.client import make_archive
from meshgpu.testing import AgentProcess, cpu_s, free_port

ROOT = Path(__file__).resolve().parents[1]
OPENAI_EXAMPLE = ROOT / "examples" / "service-openai"
BODY_1K = "x" * 1023 + "\n"
SSE_MODEL = "meshgpu/echo-small"


def log(msg: str) -> None:
    print(msg, flush=True)


# -- tools ---------------------------------------------------------------------------------------


def ensure_tools() -> dict[str, str | None]:
    """wrk and nginx, installed with apt-get when missing and root."""
    missing = [pkg for tool, pkg in (("wrk", "wrk"), ("nginx", "nginx-light")) if not _which(tool)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {' '.join(missing)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        if subprocess.run(cmd, env=env, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
            subprocess.run(cmd, env=env, capture_output=True, check=False)
    return {"wrk": _which("wrk"), "nginx": _which("nginx")}


def _which(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}") if os.access(p, os.X_OK)), None
    )


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(wrk_bin: str, url: str, connections: int, seconds: float, threads: int) -> dict[str, Any]:
    """One wrk run: requests/s, latency percentiles (ms), errors (non-2xx and socket errors)."""
    cmd = [wrk_bin, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds:g}s"]
    cmd += ["--latency", "--timeout", "5s", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    text = out.stdout + out.stderr
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", text, re.M))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    total = re.search(r"(\d+) requests in", text)
    if not rps or not total:
        raise RuntimeError(f"wrk gave no figures for {url}:\n{text}")
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "p50_ms": _ms(lat["50"]) if "50" in lat else None,
        "p99_ms": _ms(lat["99"]) if "99" in lat else None,
        "errors": errors + (int(non2xx.group(1)) if non2xx else 0),
    }


# -- nginx ---------------------------------------------------------------------------------------

NGINX_MAIN = """worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{body}
}}
"""

REPLICA_SERVER = """    server {{
        listen {port} reuseport;
        default_type text/plain;
        location / {{ return 200 "{body}"; }}
    }}"""

PROXY_SERVER = """    upstream replica {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replica;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def nginx_conf(prefix: str, server: str) -> str:
    return NGINX_MAIN.format(prefix=prefix, body=server)


# -- the agent and its services ------------------------------------------------------------------


def fast_service(port: int) -> str:
    """A service whose one replica is nginx answering 1 KiB (its config comes in the code)."""
    return f"""type: service
name: fast
port: {port}
auth: false
commands:
  - mkdir -p nginx && sed "s|@PREFIX@|$PWD/nginx|" nginx.conf.in > nginx/nginx.conf
  - exec {NGINX} -e stderr -p "$PWD/nginx" -c "$PWD/nginx/nginx.conf" -g "daemon off;"
resources:
  cpu: 1..
  memory: 64MB..
  disk: 0.1GB..
"""


NGINX = "nginx"


def sse_service(port: int, delay: float) -> str:
    return f"""type: service
name: sse
port: {port}
auth: false
env:
  - PORT={port}
  - TOKEN_DELAY={delay}
  - MODEL_NAME={SSE_MODEL}
commands:
  - exec python3 server.py
resources:
  cpu: 1..
  memory: 64MB..
  disk: 0.1GB..
"""


def submit(agent: AgentProcess, config: str, code_dir: Path) -> str:
    c = agent.client()
    data, sha = make_archive(code_dir)
    c.upload_code(data, sha)
    return c.submit(config, code_sha256=sha)["name"]


def wait_http(url: str, deadline: float, ok: Callable[[httpx.Response], bool]) -> str | None:
    """Poll ``url`` until ``ok``; None then, else the last answer or error (at the deadline)."""
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=2)
            if ok(r):
                return None
            last = f"HTTP {r.status_code}: {r.text[:200]!r}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.1)
    return last


def run_status(agent: AgentProcess, name: str) -> str:
    try:
        doc = agent.client().run(name)
    except Exception as e:  # noqa: BLE001 - reported, the bench goes on
        return f"unknown ({e})"
    return str(doc.get("status"))


# -- SSE -----------------------------------------------------------------------------------------


def sse_request(host: str, port: int, path: str, tokens: int) -> bytes:
    body = json.dumps(
        {
            "model": SSE_MODEL,
            "messages": [{"role": "user", "content": "stream please"}],
            "max_tokens": tokens,
            "stream": True,
        }
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def sse_stream(
    port: int, path: str, tokens: int, timeout: float, first_only: bool = False
) -> tuple[bool, float | None, int]:
    """One streamed chat completion over a raw connection: (all events came, seconds to the
    first event, events seen). Events: the role chunk, ``tokens`` tokens, the finish chunk and
    ``[DONE]``."""
    want = tokens + 3
    t0 = time.perf_counter()
    first: float | None = None
    buf = b""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(sse_request("127.0.0.1", port, path, tokens))
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    buf += data
                    if first is None and b"data: " in buf:
                        first = time.perf_counter() - t0
                        if first_only:
                            break
                    if b"data: [DONE]" in buf and buf.endswith(b"0\r\n\r\n"):
                        break
    except (trio.TooSlowError, OSError, trio.BrokenResourceError):
        pass
    events = buf.count(b"data: ")
    ok = buf.startswith(b"HTTP/1.1 200") and events == want and b"data: [DONE]" in buf
    return ok, first, events


async def sse_many(
    port: int, path: str, n: int, tokens: int, hold: float, ramp_s: float
) -> dict[str, Any]:
    """``n`` concurrent streams opened over ``ramp_s`` seconds and held to their end."""
    results: list[tuple[bool, float | None, int]] = []

    async def one(delay: float) -> None:
        await trio.sleep(delay)
        results.append(await sse_stream(port, path, tokens, timeout=hold + ramp_s + 30))

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, ramp_s * i / n)
    firsts = sorted(f for _, f, _ in results if f is not None)
    return {
        "held": sum(ok for ok, _, _ in results),
        "opened": n,
        "wall_s": time.perf_counter() - t0,
        "ttfb_p50_ms": statistics.median(firsts) * 1000 if firsts else None,
        "ttfb_max_ms": firsts[-1] * 1000 if firsts else None,
    }


async def sse_ttfb(port: int, path: str, n: int) -> float | None:
    """Median time to the first event (ms) of ``n`` sequential streams at low load."""
    firsts = []
    for _ in range(n):
        ok, first, _ = await sse_stream(port, path, 2, timeout=10, first_only=True)
        if first is not None:
            firsts.append(first)
    return statistics.median(firsts) * 1000 if firsts else None


# -- the bench -----------------------------------------------------------------------------------


class Budget(Exception):
    pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=5, help="seconds per throughput run")
    p.add_argument("--latency-duration", type=float, default=3, help="seconds per -c1 run")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best counts")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 2)))
    p.add_argument("--sse-streams", type=int, default=1000)
    p.add_argument("--sse-hold", type=float, default=10, help="seconds each stream lasts")
    p.add_argument("--sse-tokens", type=int, default=20)
    p.add_argument("--no-sse", action="store_true")
    p.add_argument("--https", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--budget", type=float, default=300, help="seconds for the whole bench")
    p.add_argument(
        "--data-planes",
        default="embedded,nginx",
        help="which ingress data planes to measure: embedded, nginx, or both (default)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="sample the agent with py-spy (pip install py-spy) during the ingress throughput "
        "run and print where its time goes",
    )
    p.add_argument(
        "--fake-ingress",
        action="store_true",
        help="check the bench itself: an nginx serving the ingress paths stands in for the agent",
    )
    args = p.parse_args()
    planes = [x.strip() for x in args.data_planes.split(",") if x.strip()]
    if not planes or not set(planes) <= {"embedded", "nginx"}:
        p.error("--data-planes takes embedded, nginx or embedded,nginx")

    def over_budget(signum: int, frame: Any) -> None:
        raise Budget(f"the bench ran past its budget of {args.budget:.0f} s")

    signal.signal(signal.SIGALRM, over_budget)
    signal.alarm(int(args.budget))
    # 1,000 streams: client sockets here, two sockets each in the agent (which inherits this).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(want, 1 << 16)), hard))

    out: dict[str, Any] = dict.fromkeys(
        [
            "ingress_rps",
            "direct_rps",
            "nginx_rps",
            "ingress_added_p50_ms",
            "ingress_added_p99_ms",
            "sse_ttfb_added_ms",
            "sse_streams_held",
        ]
    )
    tools = ensure_tools()
    global NGINX
    root = Path(tempfile.mkdtemp(prefix="bench-ingress-"))
    procs: list[subprocess.Popen[bytes]] = []
    agents: list[AgentProcess] = []
    try:
        if not tools["wrk"] or not tools["nginx"]:
            raise RuntimeError(
                f"needs wrk and nginx (apt-get install wrk nginx-light); found {tools}"
            )
        NGINX = tools["nginx"] or "nginx"
        agent = AgentProcess(root, "agent", extra=["--api-tls", "off"])
        agent.start()
        agents.append(agent)
        log(f"agent up at {agent.url} (API over plain HTTP), data in {root}")

        # -- the fast replica and the services -------------------------------------------------
        fast_port, sse_port, proxy_port = free_port(), free_port(), free_port()
        code = root / "fast-code"
        code.mkdir()
        server = REPLICA_SERVER.format(port=fast_port, body=BODY_1K[:-1] + "\\n")
        (code / "nginx.conf.in").write_text(nginx_conf("@PREFIX@", server))
        fast = submit(agent, fast_service(fast_port), code)
        sse = None
        if not args.no_sse:
            delay = args.sse_hold / args.sse_tokens
            sse = submit(agent, sse_service(sse_port, delay), OPENAI_EXAMPLE)
        direct = f"http://127.0.0.1:{fast_port}/"
        err = wait_http(direct, time.monotonic() + 60, lambda r: r.status_code == 200)
        if err:
            raise RuntimeError(
                f"the fast replica did not answer at {direct} ({err}); run {fast} is "
                f"{run_status(agent, fast)}\n{agent.log_tail()}"
            )
        assert len(httpx.get(direct).content) == 1024
        base = agent.url
        if args.fake_ingress:
            base = start_fake_ingress(root, procs, {fast: fast_port, sse or "-": sse_port})
            log(f"!! --fake-ingress: nginx at {base} stands in for the agent's ingress")
        ingress = f"{base}/proxy/services/main/{fast}/"
        ingress_error = wait_http(
            ingress,
            time.monotonic() + 20,
            lambda r: r.status_code == 200 and r.content == BODY_1K.encode(),
        )
        if ingress_error:
            ingress_error = f"GET {ingress}: {ingress_error} (is the ingress in this build?)"
            log(f"!! the ingress does not serve the replica: {ingress_error}")
            log("!! the ingress figures are null; the direct and nginx ones still come")
        else:
            log(f"replica ready; ingress {ingress} answers 1 KiB")
        # The nginx data plane: a second agent (plain HTTP too) drives a local nginx.
        bases = {"ingress": base} if "embedded" in planes else {}
        nginx_plane_error = None
        if "nginx" in planes and not ingress_error and not args.fake_ingress:
            try:
                ng = AgentProcess(
                    root, "agent-nginx", extra=["--api-tls", "off", "--data-plane", "nginx"]
                )
                agents.append(ng)
                ng.start(agent.join_token(), agent.url)
                url = f"{ng.url}/proxy/services/main/{fast}/"
                err = wait_http(
                    url,
                    time.monotonic() + 30,
                    lambda r: r.status_code == 200 and r.content == BODY_1K.encode(),
                )
                if err:
                    raise RuntimeError(f"GET {url}: {err}\n{ng.log_tail()}")
                # Until nginx serves it natively (not the agent behind it): its upstream.
                conf = ng.data / "nginx" / "nginx.conf"
                deadline = time.monotonic() + 30
                while f":{fast_port} " not in conf.read_text():
                    if time.monotonic() > deadline:
                        raise RuntimeError("nginx never got the replica in its upstream")
                    time.sleep(0.2)
                time.sleep(0.5)
                bases["ingress_nginx"] = ng.url
                log(f"nginx data plane: {url} (agent {ng.url}, one nginx worker)")
            except Exception as e:  # noqa: BLE001 - reported; the embedded figures still come
                nginx_plane_error = f"{type(e).__name__}: {str(e)[:300]}"
                log(f"!! the nginx data plane did not come up: {nginx_plane_error}")
        if not bases and not ingress_error:
            ingress_error = "no data plane to measure"

        # -- nginx as a reverse proxy ----------------------------------------------------------
        prefix = root / "proxy-nginx"
        prefix.mkdir()
        (prefix / "nginx.conf").write_text(
            nginx_conf(str(prefix), PROXY_SERVER.format(port=proxy_port, upstream=fast_port))
        )
        proxy_log = open(root / "proxy-nginx.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [NGINX, "-e", "stderr", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
                + ["-g", "daemon off;"],
                stdout=proxy_log,
                stderr=subprocess.STDOUT,
            )
        )
        proxied = f"http://127.0.0.1:{proxy_port}/"
        err = wait_http(proxied, time.monotonic() + 10, lambda r: r.status_code == 200)
        if err:
            raise RuntimeError(f"the nginx reverse proxy did not answer ({err})")

        # -- throughput, 64 keep-alive connections ---------------------------------------------
        c, d, t = args.connections, args.duration, args.threads
        targets = {"direct": direct, "nginx": proxied}
        if not ingress_error:
            for name, b in bases.items():
                targets[name] = f"{b}/proxy/services/main/{fast}/"
        log(
            f"throughput: wrk -t{t} -c{c} -d{d:g}s, 1 KiB responses; best of {args.rounds} "
            "interleaved rounds (other work on the machine only slows a run down)"
        )
        runs: dict[str, dict[str, Any]] = {}
        pids = {"ingress": agent.pid}
        if "ingress_nginx" in bases:
            pids["ingress_nginx"] = agents[-1].pid
        for rnd in range(args.rounds):
            for name, url in targets.items():
                profiling = args.profile and name == "ingress" and rnd == 0
                spy = start_profile(agent.pid, d, root / "agent.pyspy") if profiling else None
                pid = pids.get(name)
                cpu0 = cpu_s(pid) if pid else 0.0
                r = wrk(tools["wrk"], url, c, d, t)
                if pid and r["requests"]:
                    r["cpu_us"] = (cpu_s(pid) - cpu0) / r["requests"] * 1e6
                if spy is not None:
                    report_profile(spy, root / "agent.pyspy")
                if name not in runs or r["rps"] > runs[name]["rps"]:
                    runs[name] = r
        for name, r in runs.items():
            log(
                f"  {name:14s} {r['rps']:>10,.0f} req/s   p50 {r['p50_ms']:.3f} ms  "
                f"p99 {r['p99_ms']:.3f} ms   errors {r['errors']}"
            )
        out["direct_rps"] = round(runs["direct"]["rps"])
        out["nginx_rps"] = round(runs["nginx"]["rps"])
        # The headline keys are the nginx data plane's when it ran; the embedded one's also
        # under *_embedded.
        for name, suffix in (("ingress", "_embedded"), ("ingress_nginx", "_nginx_plane")):
            if name not in runs:
                continue
            ir = runs[name]
            out[f"ingress{suffix}_rps"] = round(ir["rps"])
            out[f"ingress_errors{suffix}"] = ir["errors"]
            out[f"ingress_vs_nginx{suffix}"] = round(ir["rps"] / runs["nginx"]["rps"], 3)
            if "cpu_us" in ir:
                out[f"ingress_cpu_us_per_req{suffix}"] = round(ir["cpu_us"], 1)
            log(
                f"  {name}/nginx {out[f'ingress_vs_nginx{suffix}']:.2f}x (target >= 0.25); "
                f"agent CPU {out.get(f'ingress_cpu_us_per_req{suffix}')} us per request"
            )
        head = "_nginx_plane" if "ingress_nginx" in runs else "_embedded"
        for key in ("rps", "errors", "vs_nginx", "cpu_us_per_req"):
            full = f"ingress{head}_{key}" if key == "rps" else f"ingress_{key}{head}"
            if full in out:
                out[f"ingress_{key}"] = out[full]
        out["ingress_data_plane"] = "nginx" if head == "_nginx_plane" else "embedded"

        # -- added latency at low load ---------------------------------------------------------
        ld = args.latency_duration
        log(
            f"latency at low load: wrk -c1 -d{ld:g}s (one request at a time), the lowest of "
            f"{args.rounds} interleaved rounds"
        )
        low: dict[str, dict[str, Any]] = {}
        for _ in range(args.rounds):
            for name, url in targets.items():
                r = wrk(tools["wrk"], url, 1, ld, 1)
                best = low.setdefault(name, r)
                best["p50_ms"] = min(best["p50_ms"], r["p50_ms"])
                best["p99_ms"] = min(best["p99_ms"], r["p99_ms"])
        for name, r in low.items():
            log(f"  {name:8s} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms")
        out["direct_p50_ms"] = low["direct"]["p50_ms"]
        out["nginx_added_p50_ms"] = round(low["nginx"]["p50_ms"] - low["direct"]["p50_ms"], 3)
        for name, suffix in (("ingress", "_embedded"), ("ingress_nginx", "")):
            if name not in low:
                continue
            p50 = round(low[name]["p50_ms"] - low["direct"]["p50_ms"], 3)
            p99 = round(low[name]["p99_ms"] - low["direct"]["p99_ms"], 3)
            out[f"ingress_added_p50_ms{suffix}"] = p50
            out[f"ingress_added_p99_ms{suffix}"] = p99
            log(
                f"  {name} adds p50 {p50:.3f} ms (target <= 1), p99 {p99:.3f} ms; nginx adds "
                f"p50 {out['nginx_added_p50_ms']:.3f} ms"
            )
        if "ingress_nginx" not in low and "ingress" in low:
            out["ingress_added_p50_ms"] = out["ingress_added_p50_ms_embedded"]
            out["ingress_added_p99_ms"] = out["ingress_added_p99_ms_embedded"]

        # -- HTTPS: a second agent with the API over TLS ---------------------------------------
        if args.https and not ingress_error and not args.fake_ingress:
            try:
                tls = AgentProcess(root, "agent-tls")
                agents.append(tls)
                tls.start(agent.join_token(), agent.url)
                https = f"{tls.url}/proxy/services/main/{fast}/"
                err = wait_http_tls(https, tls, time.monotonic() + 30)
                if err:
                    raise RuntimeError(f"GET {https}: {err}")
                r = wrk(tools["wrk"], https, c, d, t)
                out["ingress_https_rps"] = round(r["rps"])
                log(f"  https    {r['rps']:>10,.0f} req/s through {tls.url} (a second agent)")
            except Exception as e:  # noqa: BLE001 - an extra figure: reported, not fatal
                log(f"  https: skipped ({e})")

        # -- SSE: many long streams through one node -------------------------------------------
        if sse is not None:
            sse_path = "/v1/chat/completions"
            err = wait_http(
                f"http://127.0.0.1:{sse_port}/health",
                time.monotonic() + 30,
                lambda r: r.status_code == 200,
            )
            if err:
                raise RuntimeError(f"the SSE replica did not answer ({err})")
            ingress_sse = f"/proxy/services/main/{sse}{sse_path}"
            sse_planes = {} if ingress_error else dict(bases)
            for b in sse_planes.values():
                err = wait_http(
                    f"{b}/proxy/services/main/{sse}/health",
                    time.monotonic() + 20,
                    lambda r: r.status_code == 200,
                )
                if err:
                    log(f"!! the ingress at {b} does not serve the SSE replica: {err}")
            n = args.sse_streams
            log(
                f"SSE: {n} concurrent streams, {args.sse_tokens} tokens over "
                f"{args.sse_hold:g} s each (examples/service-openai)"
            )
            ttfb_direct = trio.run(sse_ttfb, sse_port, sse_path, 20)
            held_direct = trio.run(
                sse_many, sse_port, sse_path, n, args.sse_tokens, args.sse_hold, 1.0
            )
            log(
                f"  direct   held {held_direct['held']}/{n} in {held_direct['wall_s']:.1f} s, "
                f"first event p50 {_r(held_direct['ttfb_p50_ms'])} ms under load; "
                f"{_r(ttfb_direct)} ms at low load"
            )
            out["sse_direct_held"] = held_direct["held"]
            for name, b in sse_planes.items():
                suffix = "_embedded" if name == "ingress" else ""
                ingress_port = int(b.rsplit(":", 1)[1])
                ttfb_ing = trio.run(sse_ttfb, ingress_port, ingress_sse, 20)
                held = trio.run(
                    sse_many, ingress_port, ingress_sse, n, args.sse_tokens, args.sse_hold, 1.0
                )
                log(
                    f"  {name:14s} held {held['held']}/{n} in {held['wall_s']:.1f} s, first "
                    f"event p50 {_r(held['ttfb_p50_ms'])} ms under load; "
                    f"{_r(ttfb_ing)} ms at low load"
                )
                out[f"sse_streams_held{suffix}"] = held["held"]
                out["sse_streams_opened"] = n
                if ttfb_ing is not None and ttfb_direct is not None:
                    out[f"sse_ttfb_added_ms{suffix}"] = round(ttfb_ing - ttfb_direct, 3)
            if "ingress_nginx" not in sse_planes and "ingress" in sse_planes:
                out["sse_streams_held"] = out.get("sse_streams_held_embedded")
                out["sse_ttfb_added_ms"] = out.get("sse_ttfb_added_ms_embedded")
        if ingress_error:
            out["ingress_error"] = ingress_error
        if nginx_plane_error:
            out["ingress_nginx_error"] = nginx_plane_error
    except Budget as e:
        log(f"!! {e}")
        out["error"] = str(e)
    except Exception as e:  # noqa: BLE001 - the last line stays one JSON object
        log(f"!! {type(e).__name__}: {e}")
        out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    finally:
        signal.alarm(0)
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        for a in agents:
            a.close()
    print(json.dumps(out))
    sys.exit(1 if "error" in out else 0)


def start_profile(pid: int, seconds: float, path: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy")
    if spy is None:
        log("  --profile: no py-spy on PATH (pip install py-spy); not profiled")
        return None
    cmd = [spy, "record", "-p", str(pid), "-d", str(max(1, int(seconds) - 1)), "-r", "200"]
    cmd += ["-f", "raw", "-o", str(path), "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def report_profile(spy: subprocess.Popen[bytes], path: Path, top: int = 15) -> None:
    """Where the agent's samples were: self time by function (line numbers dropped) and by
    file. Stacks sampled without pausing the agent may be cut short, so only the frame on top
    counts; the folded stacks stay in ``path``."""
    try:
        _, err = spy.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if not path.exists():
        log(f"  --profile: py-spy wrote nothing ({err.decode(errors='replace')[-300:]})")
        return
    by_function: dict[str, int] = {}
    by_file: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frame = re.sub(r":\d+\)$", ")", stack.split(";")[-1])
        file = frame.rpartition(" (")[2].rstrip(")") or "?"
        total += int(n)
        by_function[frame] = by_function.get(frame, 0) + int(n)
        by_file[file] = by_file.get(file, 0) + int(n)
    if not total:
        log("  --profile: no samples")
        return
    log(f"  profile of the agent, self time ({total} samples, folded stacks in {path}):")
    for title, table in (("by function", by_function), ("by file", by_file)):
        log(f"    {title}:")
        for key, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            log(f"      {100 * n / total:5.1f}%  {key[:110]}")


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


FAKE_INGRESS_UPSTREAM = """    upstream up_{port} {{ server 127.0.0.1:{port}; keepalive 64; }}"""
FAKE_INGRESS_LOCATION = """        location /proxy/services/main/{run}/ {{
            proxy_pass http://up_{port}/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}"""


def start_fake_ingress(root: Path, procs: list[Any], services: dict[str, int]) -> str:
    """An nginx answering the ingress paths of ``services`` ({run: replica port}): the bench's
    own check while the agent has no ingress."""
    port = free_port()
    prefix = root / "fake-ingress"
    prefix.mkdir()
    locations = "\n".join(
        FAKE_INGRESS_LOCATION.format(run=run, port=p) for run, p in services.items()
    )
    upstreams = "\n".join(FAKE_INGRESS_UPSTREAM.format(port=p) for p in services.values())
    server = f"{upstreams}\n    server {{\n        listen 127.0.0.1:{port};\n{locations}\n    }}"
    (prefix / "nginx.conf").write_text(nginx_conf(str(prefix), server))
    procs.append(
        subprocess.Popen(
            [NGINX, "-e", "stderr", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
            + ["-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
    )
    return f"http://127.0.0.1:{port}"


def wait_http_tls(url: str, agent: AgentProcess, deadline: float) -> str | None:
    last = "no answer"
    with httpx.Client(verify=agent.verify, timeout=2) as c:
        while time.monotonic() < deadline:
            try:
                r = c.get(url)
                if r.status_code == 200:
                    return None
                last = f"HTTP {r.status_code}: {r.text[:200]!r}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.2)
    return last


if __name__ == "__main__":
    main()
