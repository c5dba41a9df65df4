"""The console: a small web dashboard at ``/ui`` on every node's API port.

Any node shows the whole mesh, as the API does: reads are this node's replica (no leader needed),
a run's log and metrics history come from the host that has them over the peer port, a stop is
proposed like ``meshgpu stop``.

* **Sign-in**: the API token, posted once to ``/ui/login`` and kept in an ``HttpOnly``,
  ``Secure``, ``SameSite=Strict`` cookie scoped to ``/ui`` (never in a URL). The API's guard
  (``app._Guard``) checks that cookie for every ``/ui`` path but the login page and the static
  files; a page asked for without it goes to the login page.
* **CSRF**: the cookie is ``SameSite=Strict`` and every state-changing request must carry the
  header ``X-Meshgpu-CSRF: 1`` (a custom header a cross-site form cannot send, and a cross-site
  script cannot without a CORS preflight this API never grants).
* **Pages**: server-rendered HTML; ``static/ui.js`` (no library) swaps in fragments every
  couple of seconds (``data-refresh``), tails a log over Server-Sent Events and draws the
  charts as SVG from ``/ui/api/runs/{name}/history``.

None of these routes are in ``/openapi.json`` (``include_in_schema=False``): they are the
console's, not the API's.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from meshgpu.api import problems, views
from meshgpu.errors import MeshError, NotFound
from meshgpu.ops.history import DEFAULT_POINTS, MAX_POINTS
from meshgpu.security import policy

if TYPE_CHECKING:
    from meshgpu.ops import Services

PREFIX = "/ui"
COOKIE = "meshgpu_ui"
CSRF_HEADER = "x-meshgpu-csrf"
STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"ui.js": "text/javascript", "ui.css": "text/css"}
PUBLIC = frozenset({f"{PREFIX}/login"} | {f"{PREFIX}/static/{f}" for f in STATIC_FILES})
MAX_TOKEN_BYTES = 4096
LOG_LINE_LIMIT = 8192  # characters of one log line sent to the browser
RUNS_SHOWN = 200
COOKIE_MAX_AGE_S = 12 * 3600
# Only this node's own script and styles run; no page may frame the console (its buttons stop
# runs: no clickjacking); no URL of it leaks to another site.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def is_ui(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def cookie_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The console's token from a request's ``Cookie`` headers (None: not signed in)."""
    for k, v in headers:
        if k != b"cookie":
            continue
        for part in v.decode("latin-1").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and value:
                return value
    return None


def guard(scope: dict[str, Any], token_ok: Any) -> Response | None:
    """The check ``app._Guard`` makes for a ``/ui`` path: None to go on, else the answer."""
    path, method = scope["path"], scope["method"]
    if path in PUBLIC:
        if method == "POST" and not _csrf_ok(scope):
            return _csrf_refused()
        return None
    token = cookie_token(scope["headers"])
    if not token or not token_ok(token):
        if method in ("GET", "HEAD") and not path.startswith(f"{PREFIX}/api/"):
            if path.endswith("/events") or path.startswith(f"{PREFIX}/fragments/"):
                return Response("sign in again", status_code=401, media_type="text/plain")
            return RedirectResponse(f"{PREFIX}/login", status_code=303)
        e = problems.unauthorized()
        return problems.problem_response(e.status, "not signed in", "sign in at /ui/login", e.code)
    if method not in ("GET", "HEAD") and not _csrf_ok(scope):
        return _csrf_refused()
    return None


def _csrf_ok(scope: dict[str, Any]) -> bool:
    return any(k == CSRF_HEADER.encode() and v == b"1" for k, v in scope["headers"])


def _csrf_refused() -> Response:
    return problems.problem_response(
        403,
        "missing CSRF header",
        f"the console's state-changing requests carry {CSRF_HEADER}: 1",
        "csrf",
    )


# -- rendering --------------------------------------------------------------------------------

e = html.escape


def _age(t: float | None, now: float) -> str:
    if not t:
        return "-"
    s = max(0, int(now - t))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def _page(title: str, body: str, *, nav: str = "") -> HTMLResponse:
    links = "".join(
        f'<a href="{PREFIX}/{p}"{" class=on" if p == nav else ""}>{label}</a>'
        for p, label in (("runs", "Runs"), ("nodes", "Nodes"), ("cluster", "Cluster"))
    )
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} - meshgpu</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{PREFIX}/static/ui.css">
<script src="{PREFIX}/static/ui.js" defer></script>
</head><body>
<header><b>meshgpu</b><nav>{links}</nav>
{'<button id="logout" data-post="' + PREFIX + '/logout">Sign out</button>' if nav else ""}
</header>
<main>{body}</main>
</body></html>"""
    return HTMLResponse(doc, headers=PAGE_HEADERS)


def _status(s: str) -> str:
    return f'<span class="st st-{e(s)}">{e(s)}</span>'


def _buttons(name: str, finished: bool) -> str:
    if finished:
        return ""
    q = quote(name, safe="")
    return (
        f'<button class="stop" data-post="{PREFIX}/runs/{q}/stop">Stop</button> '
        f'<button class="abort" data-post="{PREFIX}/runs/{q}/stop?abort=true" '
        f'data-confirm="Abort {e(name)} without a graceful stop?">Abort</button>'
    )


class Console:
    """The console's pages over the use cases of ``services``."""

    def __init__(self, services: Services) -> None:
        self.s = services

    # -- who sees what (the API's policy: meshgpu/security/policy.py) -------------------------

    def visible(self, who: Any, project: str) -> bool:
        """Whether ``who`` may see runs of ``project`` (everything without an access store)."""
        if self.s.access is None:
            return True
        return who is not None and policy.visible(self.s.cluster.cluster.access, who, project)

    def see_run(self, who: Any, name: str, action: str = "project.read") -> Any:
        """The run, if ``who`` may see it and do ``action`` (NotFound / Denied otherwise, as
        the API answers)."""
        acc = self.s.access
        if acc is None:
            run = self.s.state.runs.get(name)
            if run is None:
                raise NotFound("no such run", f"no run {name}", "run_not_found")
            return run
        return acc.see_run(who, name, action)

    # -- runs -------------------------------------------------------------------------------

    def runs_fragment(self, who: Any) -> str:
        state, now = self.s.state, time.time()
        mine = (r for r in state.runs.values() if self.visible(who, r.project))
        runs = sorted(mine, key=lambda r: (r.submitted_at, r.run_name))[::-1]
        rows = []
        for r in runs[:RUNS_SHOWN]:
            jobs = state.run_jobs(r)
            why = next((j.why_pending for j in jobs if j.why_pending), None) or ""
            q = quote(r.run_name, safe="")
            rows.append(
                f'<tr data-run="{e(r.run_name)}"><td><a href="{PREFIX}/runs/{q}">'
                f"{e(r.run_name)}</a></td><td>{e(r.spec.type)}</td>"
                f"<td>{_status(r.status.value)}</td><td>{e(why)}</td><td>{r.priority}</td>"
                f"<td>{_age(r.submitted_at, now)}</td>"
                f"<td>{_buttons(r.run_name, r.status.is_finished())}</td></tr>"
            )
        more = (
            f"<p>{len(runs) - RUNS_SHOWN} older runs not shown (meshgpu ps -a)</p>"
            if len(runs) > RUNS_SHOWN
            else ""
        )
        if not rows:
            return "<p>No runs. Submit one with <code>meshgpu apply -f task.yml</code>.</p>"
        return (
            "<table><thead><tr><th>Run</th><th>Type</th><th>Status</th><th>Why pending</th>"
            "<th>Priority</th><th>Age</th><th></th></tr></thead><tbody>"
            + "".join(rows)
            + "</tbody></table>"
            + more
        )

    def run_fragment(self, who: Any, name: str) -> str:
        try:
            r = self.see_run(who, name)
        except NotFound:
            return f"<p>No run {e(name)} (it may have been forgotten).</p>"
        now = time.time()
        view = views.run_summary(r, self.s.state)
        message = view["status_message"] or ""
        message = "" if message == r.status.value else message
        head = (
            f'<p class="runhead">{_status(r.status.value)} <span id="run-status" '
            f'data-status="{e(r.status.value)}"></span> {e(message)} '
            f"priority {r.priority}, submitted {_age(r.submitted_at, now)} ago "
            f"{_buttons(name, r.status.is_finished())}</p>"
        )
        rows = []
        for j in view["jobs"]:
            rows.append(
                f'<tr><td><a href="{PREFIX}/runs/{quote(name, safe="")}?job={j["job_num"]}">'
                f"{j['job_num']}</a></td><td>{_status(j['status'])}</td>"
                f"<td>{e(j['node'] or '-')}</td>"
                f"<td>{e(','.join(str(g) for g in j['gpus']) or '-')}</td>"
                f"<td>{'-' if j['exit_code'] is None else j['exit_code']}</td>"
                f"<td>{e(j['why_pending'] or j['termination_message'] or '')}</td></tr>"
            )
        return (
            head + "<table><thead><tr><th>Job</th><th>Status</th><th>Host</th><th>GPUs</th>"
            "<th>Exit code</th><th>Note</th></tr></thead><tbody>"
            + "".join(rows)
            + "</tbody></table>"
        )

    # -- nodes and cluster ----------------------------------------------------------------------

    async def nodes_fragment(self) -> str:
        s = self.s
        roles = s.cluster.roles()
        out = []
        for n in sorted(s.state.nodes.values(), key=lambda n: n.name):
            gossip = s.gossip.node_view(n.node_id) or {}
            if n.node_id == s.node_id:
                tele = await s.local_telemetry()
            else:
                tele = s.gossip.telemetry(n.node_id) or []
            util = {t["index"]: t.get("utilization_pct") for t in tele}
            busy = s.state.gpus_in_use(n.node_id)
            gpus = []
            for g in n.gpus:
                u = util.get(g.index)
                bar = f'<span class="bar"><i style="width:{min(100, u or 0):.0f}%"></i></span>'
                health = (
                    '<span class="ok">healthy</span>'
                    if g.healthy
                    else f'<span class="bad">unhealthy: {e(g.health_reason or "?")}</span>'
                )
                gpus.append(
                    f'<li data-gpu="{g.index}">gpu{g.index} {e(g.name)} '
                    f"{g.memory_mib // 1024}GB {bar} "
                    f"{'-' if u is None else f'{u:.0f}%'}{' busy' if g.index in busy else ''} "
                    f"{health}</li>"
                )
            role = roles.get(n.node_id, "") or "-"
            out.append(
                f'<section class="node" data-node="{e(n.name)}"><h3>{e(n.name)} '
                f"<small>{e(role)} · {e(n.status)} · gossip {e(gossip.get('state', 'n/a'))}"
                f"</small></h3><p>{n.cpu_count} CPUs {n.cpu_arch}, "
                f"{n.memory_mib / 1024:.0f}GB memory"
                f"{', labels ' + e(', '.join(f'{k}={v}' for k, v in n.labels.items())) if n.labels else ''}"
                f"</p><ul>{''.join(gpus) or '<li>no GPUs</li>'}</ul></section>"
            )
        return "".join(out) or "<p>No hosts registered yet.</p>"

    def cluster_fragment(self, who: Any) -> str:
        s = self.s
        st = s.cluster.status()
        roles = s.cluster.roles()
        leader = next(
            (
                s.state.nodes[n].name
                for n, r in roles.items()
                if r == "leader" and n in s.state.nodes
            ),
            "none known",
        )
        members = "".join(
            f"<tr><td>{e(s.state.nodes[n].name if n in s.state.nodes else n)}</td>"
            f"<td>{e(r)}</td></tr>"
            for n, r in sorted(roles.items(), key=lambda x: x[1])
        )
        runs = s.state.runs.values()
        by_type: dict[str, list[str]] = {"service": [], "dev-environment": []}
        for r in runs:
            if (
                r.spec.type in by_type
                and not r.status.is_finished()
                and self.visible(who, r.project)
            ):
                q = quote(r.run_name, safe="")
                by_type[r.spec.type].append(
                    f'<li><a href="{PREFIX}/runs/{q}">{e(r.run_name)}</a> '
                    f"{_status(r.status.value)}</li>"
                )
        fleets = []
        if s.fleets is not None:
            seen = s.fleets.list(who) if who is not None or s.access is None else []
            for f in seen:
                ready = sum(1 for h in f["hosts"] if h["node"])
                fleets.append(
                    f"<li>{e(f['name'])}: {ready}/{len(f['hosts'])} hosts in the mesh</li>"
                )
        return (
            f"<table><tbody><tr><th>Cluster</th><td>{e(st['cluster_id'])}</td></tr>"
            f"<tr><th>Leader</th><td id=leader>{e(leader)}</td></tr>"
            f"<tr><th>Term</th><td>{st['term']}</td></tr>"
            f"<tr><th>Commit index</th><td>{st['commit_index']}</td></tr>"
            f"<tr><th>This node</th><td>{e(st['node'])} ({e(st['role'])})</td></tr>"
            f"<tr><th>Active runs</th><td>{st['active_runs']}</td></tr>"
            f"<tr><th>Waiting jobs</th><td>{st['waiting_jobs']}</td></tr></tbody></table>"
            f"<h2>Members</h2><table><thead><tr><th>Host</th><th>Role</th></tr></thead>"
            f"<tbody>{members}</tbody></table>"
            f"<h2>Fleets</h2><ul>{''.join(fleets) or '<li>none</li>'}</ul>"
            f"<h2>Services</h2><ul>{''.join(by_type['service']) or '<li>none</li>'}</ul>"
            f"<h2>Dev environments</h2><ul>"
            f"{''.join(by_type['dev-environment']) or '<li>none</li>'}</ul>"
        )

    # -- live logs --------------------------------------------------------------------------

    async def log_events(self, name: str, job: int) -> AsyncIterator[bytes]:
        """The job's log as Server-Sent Events, one ``data:`` per line, following it until the
        job ends (then an ``end`` event)."""
        try:
            source = self.s.logs.source(name, job)
        except MeshError as err:
            yield _sse(str(err.detail or err.title), "problem")
            return
        if source.node_id is not None:
            stream = self.s.logs.proxy(source.node_id, name, job, True)
        else:
            stream = self.s.logs.stream_local(source.job.job_id, True)
        yield b": meshgpu log tail\nretry: 2000\n\n"
        pending = b""
        async for chunk in stream:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if lines:
                yield b"".join(_sse(line.decode("utf-8", "replace")) for line in lines)
            if len(pending) > LOG_LINE_LIMIT:
                yield _sse(pending.decode("utf-8", "replace"))
                pending = b""
        if pending:
            yield _sse(pending.decode("utf-8", "replace"))
        yield _sse("the job has ended", "end")


def _sse(line: str, event: str | None = None) -> bytes:
    text = line.replace("\r", "")[:LOG_LINE_LIMIT]
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def router(services: Services, principal_key: str) -> APIRouter:
    """The console's routes (their auth is ``guard``, run by the API's guard, which puts the
    signed-in caller in the request under ``principal_key``). What a page shows and does is
    what the API would let that caller see and do."""
    r = APIRouter(prefix=PREFIX, include_in_schema=False)
    console = Console(services)

    def who(request: Request) -> Any:
        return request.scope.get(principal_key)

    @r.get("")
    async def root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/runs", status_code=303)

    @r.get("/static/{name}")
    async def static(name: str) -> FileResponse:
        if name not in STATIC_FILES:
            raise problems.Problem(404, "not found", f"no static file {name}", "not_found")
        return FileResponse(
            STATIC / name,
            media_type=STATIC_FILES[name],
            headers={"Cache-Control": "max-age=300"},
        )

    @r.get("/login")
    async def login_page() -> HTMLResponse:
        return _page(
            "Sign in",
            f"""<form id="login" data-login="{PREFIX}/login" class="login">
<h1>Sign in</h1>
<p>Paste the cluster's API token (<code>token</code> in <code>~/.meshgpu/client.toml</code>).</p>
<input type="password" name="token" id="token" autocomplete="current-password" required
 placeholder="API token" maxlength="{MAX_TOKEN_BYTES}">
<button type="submit">Sign in</button>
<p id="login-error" class="bad" role="alert"></p>
</form>""",
        )

    @r.post("/login")
    async def login(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_TOKEN_BYTES:
            raise problems.Problem(413, "token too long", "an API token is short", "too_large")
        try:
            token = str(json.loads(body or b"{}").get("token") or "").strip()
        except (ValueError, AttributeError):
            raise problems.Problem(
                400, "bad sign-in", 'send {"token": "..."} as JSON', "invalid_request"
            ) from None
        if not token or not token.isascii() or not services.cluster.api_token_ok(token):
            raise problems.Problem(
                401, "wrong token", "that is not this cluster's API token", "unauthorized"
            )
        resp = Response(status_code=204)
        resp.set_cookie(
            COOKIE,
            token,
            max_age=COOKIE_MAX_AGE_S,
            path=PREFIX,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return resp

    @r.post("/logout")
    async def logout() -> Response:
        resp = Response(status_code=204)
        resp.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
        return resp

    @r.get("/runs")
    async def runs_page(request: Request) -> HTMLResponse:
        body = (
            f'<h1>Runs</h1><div id="runs" data-refresh="{PREFIX}/fragments/runs">'
            f"{console.runs_fragment(who(request))}</div>"
        )
        return _page("Runs", body, nav="runs")

    @r.get("/fragments/runs")
    async def runs_fragment(request: Request) -> HTMLResponse:
        return HTMLResponse(
            console.runs_fragment(who(request)), headers={"Cache-Control": "no-store"}
        )

    @r.get("/runs/{name}")
    async def run_page(
        request: Request, name: str, job: Annotated[int, Query(ge=0, le=100_000)] = 0
    ) -> Response:
        try:
            console.see_run(who(request), name)
        except NotFound:
            return _page("Not found", f"<h1>No run {e(name)}</h1>", nav="runs")
        q = quote(name, safe="")
        body = f"""<h1>{e(name)}</h1>
<div id="run" data-refresh="{PREFIX}/fragments/runs/{q}">{console.run_fragment(who(request), name)}</div>
<h2>Usage <small>(job {job}; kept by its host)</small></h2>
<div class="charts" data-history="{PREFIX}/api/runs/{q}/history?job={job}">
<figure><figcaption>GPU utilization %</figcaption><svg id="chart-gpu" class="chart"></svg></figure>
<figure><figcaption>CPU %</figcaption><svg id="chart-cpu" class="chart"></svg></figure>
<figure><figcaption>Memory</figcaption><svg id="chart-mem" class="chart"></svg></figure>
</div>
<h2>Log <small>(job {job}, live)</small></h2>
<pre id="log" data-events="{PREFIX}/runs/{q}/events?job={job}"></pre>"""
        return _page(name, body, nav="runs")

    @r.get("/fragments/runs/{name}")
    async def run_fragment(request: Request, name: str) -> HTMLResponse:
        return HTMLResponse(
            console.run_fragment(who(request), name), headers={"Cache-Control": "no-store"}
        )

    @r.get("/runs/{name}/events")
    async def run_events(
        request: Request, name: str, job: Annotated[int, Query(ge=0, le=100_000)] = 0
    ) -> StreamingResponse:
        console.see_run(who(request), name)
        return StreamingResponse(
            console.log_events(name, job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @r.post("/runs/{name}/stop")
    async def stop(request: Request, name: str, abort: bool = False) -> JSONResponse:
        console.see_run(who(request), name, "run.stop")
        run = await services.runs.stop(name, abort)
        return JSONResponse({"name": name, "status": run.status.value})

    @r.get("/api/runs/{name}/history")
    async def history(
        request: Request,
        name: str,
        job: Annotated[int, Query(ge=0, le=100_000)] = 0,
        since_s: Annotated[float, Query(gt=0, le=7 * 86400)] = 3600.0,
        points: Annotated[int, Query(ge=1, le=MAX_POINTS)] = DEFAULT_POINTS,
    ) -> dict[str, Any]:
        console.see_run(who(request), name)
        return await services.metrics.history_of(
            name, job, since_s=since_s, points=points, local=False
        )

    @r.get("/nodes")
    async def nodes_page() -> HTMLResponse:
        body = (
            f'<h1>Nodes</h1><div id="nodes" data-refresh="{PREFIX}/fragments/nodes">'
            f"{await console.nodes_fragment()}</div>"
        )
        return _page("Nodes", body, nav="nodes")

    @r.get("/fragments/nodes")
    async def nodes_fragment() -> HTMLResponse:
        return HTMLResponse(await console.nodes_fragment(), headers={"Cache-Control": "no-store"})

    @r.get("/cluster")
    async def cluster_page(request: Request) -> HTMLResponse:
        body = (
            f'<h1>Cluster</h1><div id="cluster" data-refresh="{PREFIX}/fragments/cluster">'
            f"{console.cluster_fragment(who(request))}</div>"
        )
        return _page("Cluster", body, nav="cluster")

    @r.get("/fragments/cluster")
    async def cluster_fragment(request: Request) -> HTMLResponse:
        return HTMLResponse(
            console.cluster_fragment(who(request)), headers={"Cache-Control": "no-store"}
        )

    return r


__all__ = ["COOKIE", "CSRF_HEADER", "PREFIX", "guard", "is_ui", "router"]
