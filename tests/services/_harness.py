"""The ingress under test: the real API app (ingress in front) served by hypercorn over a
StateMachine fed with real commands, and real upstream replicas (hypercorn over a small ASGI
app) listening on loopback addresses of their own (127.0.0.2, 127.0.0.3: the "hosts" n1, n2).

Readiness: ``ReplicaProbes`` has no handler on this branch yet, so ``ready`` sets
``job.ready`` directly and moves the applied index on (what an applied entry would do)."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

from meshgpu.api.server import listen, serve
from meshgpu.config import parse_config
from meshgpu.config.render import to_json
from meshgpu.services.ingress import Ingress, IngressSettings
from meshgpu.services.stats import ServiceCounters
from meshgpu.state import (
    AssignJobs,
    JobFinished,
    JobStarted,
    JobStatus,
    JobTerminationReason,
    StateMachine,
    SubmitRun,
    encode,
)
from meshgpu.state.commands import Assignment
from meshgpu.testing import host
from tests.api._stub import TOKEN, StubAgent

HOSTS = {"n1": "127.0.0.2", "n2": "127.0.0.3"}
_ids = itertools.count()


def apply(state: StateMachine, cmd: Any) -> Any:
    result = state.apply([(state.applied_index + 1, encode(cmd))])[0]
    assert result.ok, result
    return result.value


def mesh() -> StateMachine:
    state = StateMachine()
    apply(state, host("n0"))
    for node_id, ip in HOSTS.items():
        apply(state, host(node_id).model_copy(update={"internal_ip": ip}))
    return state


def service_yaml(name: str, port: int, **fields: Any) -> str:
    lines = [
        "type: service",
        f"name: {name}",
        f"port: {port}",
        "commands: [serve]",
    ]
    for k, v in fields.items():
        lines.append(f"{k}: {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def submit(state: StateMachine, name: str, port: int, project: str = "main", **fields: Any) -> str:
    config = to_json(parse_config(service_yaml(name, port, **fields)))
    n = next(_ids)
    apply(
        state,
        SubmitRun(
            at=1.0,
            request_id=f"req-{n}",
            run_id=f"id-{name}-{n}",
            run_name=name,
            project=project,
            config=config,
        ),
    )
    return state.runs[name].run_id


def place(state: StateMachine, name: str, nodes: list[str]) -> list[str]:
    """Assign the run's waiting jobs to ``nodes`` (in order) and start them."""
    run = state.runs[name]
    waiting = [j for j in run.job_ids if state.jobs[j].status == JobStatus.SUBMITTED]
    assignments = [
        Assignment(job_id=j, node_id=n, gpu_indices=[])
        for j, n in zip(waiting, nodes, strict=False)
    ]
    res = apply(state, AssignJobs(at=2.0, assignments=assignments))
    assert res["accepted"], res
    for j in res["accepted"]:
        apply(state, JobStarted(at=3.0, job_id=j, epoch=state.jobs[j].epoch, started_at=3.0))
    return list(res["accepted"])


def ready(state: StateMachine, ingress: Ingress, job_id: str, value: bool = True) -> None:
    state.jobs[job_id].ready = value
    state.applied_index += 1
    ingress.notify()


def finish(state: StateMachine, job_id: str) -> None:
    job = state.jobs[job_id]
    apply(
        state,
        JobFinished(
            at=9.0, job_id=job_id, epoch=job.epoch, reason=JobTerminationReason.DONE_BY_RUNNER
        ),
    )


# -- the upstream replica ----------------------------------------------------------------------
@dataclass
class Upstream:
    """One replica: what it saw, and switches the tests turn."""

    name: str
    host: str
    port: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)
    gate: trio.Event = field(default_factory=trio.Event)  # /slow waits for it

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        path = scope["path"]
        body = bytearray()
        chunks = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            chunks += 1
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append({"path": path, "raw_path": scope["raw_path"], "headers": headers})
        if path.endswith("/sse"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            for i in range(3):
                await send(
                    {"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True}
                )
                await self.gate.wait()  # the test lets the next event go
                self.gate = trio.Event()
            await send({"type": "http.response.body", "body": b""})
            return
        if path.endswith("/die"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise RuntimeError("the replica dies mid-stream")
        if path.endswith("/slow"):
            await self.gate.wait()
        if path.endswith("/v1/chat/completions"):
            await self._chat(json.loads(body), send)
            return
        answer = json.dumps(
            {
                "replica": self.name,
                "method": scope["method"],
                "path": path,
                "raw_path": scope["raw_path"].decode(),
                "query": scope["query_string"].decode(),
                "headers": headers,
                "body_len": len(body),
                "chunks": chunks,
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    async def _chat(self, request: dict[str, Any], send: Any) -> None:
        words = ["Hello", " from", " " + self.name]
        if not request.get("stream"):
            body = {
                "id": "c1",
                "object": "chat.completion",
                "created": 1,
                "model": request["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(words)},
                        "finish_reason": "stop",
                    }
                ],
            }
            data = json.dumps(body).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": data})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for i, w in enumerate(words):
            chunk = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": request["model"],
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": w},
                        "finish_reason": "stop" if i == len(words) - 1 else None,
                    }
                ],
            }
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + json.dumps(chunk).encode() + b"\n\n",
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": f"{self.name}:{message['text']}"})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})


def bind(host: str, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    return sock


async def run_upstream(
    nursery: trio.Nursery, upstream: Upstream, sock: socket.socket
) -> trio.CancelScope:
    """Serve ``upstream`` on ``sock``; cancel the returned scope to stop it."""
    cfg = hypercorn.config.Config()
    cfg.bind = [f"fd://{sock.detach()}"]
    cfg.accesslog = None
    cfg.graceful_timeout = 0.1
    scope = trio.CancelScope()

    async def serve_it(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await hypercorn.trio.serve(upstream.app, cfg, task_status=task_status)

    await nursery.start(serve_it)
    return scope


@dataclass
class World:
    state: StateMachine
    ingress: Ingress
    url: str
    upstreams: dict[str, Upstream]
    stops: dict[str, trio.CancelScope]
    port: int
    nursery: trio.Nursery

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


@asynccontextmanager
async def world(
    tmp: Path, replicas: tuple[str, ...] = ("n1", "n2"), **settings: Any
) -> AsyncIterator[World]:
    """Upstream replicas on ``replicas``' addresses (same port), and the ingress of node n0."""
    state = mesh()
    socks = {}
    first = bind(HOSTS[replicas[0]]) if replicas else None
    port = first.getsockname()[1] if first else 1
    for i, node in enumerate(replicas):
        socks[node] = first if i == 0 else bind(HOSTS[node], port)
    services = StubAgent(state, tmp, node_id="n0")
    ingress = Ingress(
        state, "n0", services.cluster.api_token_ok, ServiceCounters(), IngressSettings(**settings)
    )
    services.ingress = ingress
    async with trio.open_nursery() as nursery:
        upstreams, stops = {}, {}
        for node, sock in socks.items():
            up = Upstream(node, HOSTS[node], port)
            upstreams[node] = up
            stops[node] = await run_upstream(nursery, up, sock)
        api = listen("127.0.0.1", 0)
        api_port = api.getsockname()[1]
        await serve(nursery, api, services, None)
        nursery.start_soon(ingress.run)
        yield World(state, ingress, f"http://127.0.0.1:{api_port}", upstreams, stops, port, nursery)
        nursery.cancel_scope.cancel()


async def websocket_echo(url: str) -> None:
    """A WebSocket through the ingress at ``url`` to the upstream's echo (``/ws``): text comes
    back tagged with the replica, bytes reversed."""
    import wsproto
    import wsproto.events as wse

    port = int(url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(ws.send(wse.Request(host="x", target="/proxy/services/main/svc/ws")))

    async def events() -> list[object]:
        with trio.fail_after(5):
            while True:
                ws.receive_data(await stream.receive_some(65536))
                got = list(ws.events())
                if got:
                    return got

    assert isinstance((await events())[0], wse.AcceptConnection)
    await stream.send_all(ws.send(wse.TextMessage(data="hi")))
    (msg,) = await events()
    assert isinstance(msg, wse.TextMessage) and msg.data == "n1:hi"
    await stream.send_all(ws.send(wse.BytesMessage(data=b"abc")))
    (msg,) = await events()
    assert isinstance(msg, wse.BytesMessage) and msg.data == b"cba"
    await stream.send_all(ws.send(wse.CloseConnection(code=1000)))
    await stream.aclose()
