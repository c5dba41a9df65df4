"""The nginx data plane under test: the embedded-ingress world of ``_harness.py`` (a state fed
with real commands, real replicas on 127.0.0.2/127.0.0.3), with a real nginx driven by the
agent's ``NginxPlane`` owning the API port and the agent's app behind it on a unix socket.

Tests that need nginx skip when it is missing, except under CI=true (scripts/test installs
nginx-light as root there): then they fail."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from meshgpu.api.server import listen, serve
from meshgpu.services.ingress import Ingress, IngressSettings
from meshgpu.services.nginx import NginxPlane, find_nginx, front
from meshgpu.services.stats import ServiceCounters
from tests.api._stub import TOKEN, StubAgent
from tests.services._harness import HOSTS, Upstream, bind, mesh, place, run_upstream, submit

NGINX = find_nginx()
needs_nginx = pytest.mark.skipif(
    NGINX is None and os.environ.get("CI") != "true",
    reason="nginx is not installed (apt-get install nginx-light); CI installs it",
)


@dataclass
class NWorld:
    state: Any
    ingress: Ingress
    plane: NginxPlane
    url: str
    port: int  # the replicas' port
    upstreams: dict[str, Upstream]
    stops: dict[str, trio.CancelScope]
    nursery: trio.Nursery

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def ready(self, job_id: str, value: bool = True) -> None:
        self.state.jobs[job_id].ready = value
        self.state.applied_index += 1
        self.ingress.notify()
        self.plane.notify()

    async def reloaded(self, before: int) -> None:
        """Until nginx took a new configuration (SIGHUP sent, new workers up)."""
        await wait_until(lambda: self.plane.reloads > before)
        await trio.sleep(0.3)

    async def up(
        self,
        name: str = "svc",
        nodes: tuple[str, ...] = ("n1",),
        native: bool = True,
        **fields: Any,
    ) -> list[str]:
        """A ready service; ``native``: nginx serves it (wait for the reload)."""
        fields.setdefault("auth", False)
        submit(self.state, name, self.port, replicas=len(nodes), **fields)
        jobs = place(self.state, name, list(nodes))
        before = self.plane.reloads
        for j in jobs:
            self.ready(j)
        if native:
            await self.reloaded(before)
        else:
            await trio.sleep(0.3)
        return jobs


async def wait_until(cond: Callable[[], bool], timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.02)


@asynccontextmanager
async def nginx_world(
    tmp: Path, replicas: tuple[str, ...] = ("n1", "n2"), domain: str | None = None, **kw: Any
) -> AsyncIterator[NWorld]:
    assert NGINX is not None, "nginx is not installed (apt-get install nginx-light)"
    state = mesh()
    first = bind(HOSTS[replicas[0]])
    port = first.getsockname()[1]
    socks = {node: first if i == 0 else bind(HOSTS[node], port) for i, node in enumerate(replicas)}
    services = StubAgent(state, tmp / "agent", node_id="n0")
    ingress = Ingress(
        state,
        "n0",
        services.cluster.api_token_ok,
        ServiceCounters(),
        IngressSettings(domain=domain, **kw),
    )
    services.ingress = ingress
    plane = NginxPlane(NGINX, tmp / "nginx", ingress, domain=domain)
    plane.prepare()
    api = listen("127.0.0.1", 0)
    try:
        async with _running(state, ingress, plane, services, api, socks, port) as w:
            yield w
    finally:
        api.close()


@asynccontextmanager
async def _running(
    state: Any,
    ingress: Ingress,
    plane: NginxPlane,
    services: Any,
    api: Any,
    socks: dict[str, Any],
    port: int,
) -> AsyncIterator[NWorld]:
    async with trio.open_nursery() as nursery:
        upstreams, stops = {}, {}
        for node, sock in socks.items():
            up = Upstream(node, HOSTS[node], port)
            upstreams[node] = up
            stops[node] = await run_upstream(nursery, up, sock)
        api_port = api.getsockname()[1]
        await serve(nursery, plane.agent_socket(), services, None, wrap=lambda a: front(a, ingress))
        nursery.start_soon(ingress.run)
        await nursery.start(plane.run, api)
        try:
            yield NWorld(
                state,
                ingress,
                plane,
                f"http://127.0.0.1:{api_port}",
                port,
                upstreams,
                stops,
                nursery,
            )
        finally:
            nursery.cancel_scope.cancel()
