"""Serving the API: a socket bound early (the API URL names its real port), served by hypercorn
in the agent's nursery once the use cases it calls exist, behind a front door that answers the
SSH tunnel's plain byte stream itself (``meshgpu/api/front.py``)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import hypercorn.config
import trio

from meshgpu.api import tunnel
from meshgpu.api.app import create_app
from meshgpu.api.front import Front
from meshgpu.mesh.address import is_unspecified
from meshgpu.services.nginx import NginxPlane, front

if TYPE_CHECKING:
    from pathlib import Path

    from meshgpu.ops import Services
    from meshgpu.security import NodeIdentity


def listen(bind: str, port: int) -> socket.socket:
    """A listening TCP socket for the API (``bind`` empty or unspecified: every address)."""
    host = bind.strip("[]") or None
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and is_unspecified(bind):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(
    nursery: trio.Nursery,
    sock: socket.socket,
    services: Services,
    tls: NodeIdentity | None,
    wrap: Callable[[Any], Any] | None = None,
) -> None:
    """Serve the API on ``sock`` (over TLS with this node's certificate unless ``tls`` None;
    ``wrap``: what stands in front of the app, e.g. the nginx data plane's ``front``)."""
    cfg = hypercorn.config.Config()
    if tls is not None:
        cfg.certfile = str(tls.files.cert)
        cfg.keyfile = str(tls.files.key)
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.graceful_timeout = 1.0
    app = create_app(services)  # (sets services.tunnels)
    assert services.tunnels is not None
    ingress = services.ingress
    raw = tunnel.RawTunnel(
        services.tunnels,
        services.cluster.principal,
        ingress.domain if ingress is not None else None,
    )
    front = Front(wrap(app) if wrap else app, cfg, tunnel.UPGRADE, raw.claim)
    await nursery.start(partial(front.serve, sock))


async def serve_front(
    nursery: trio.Nursery,
    sock: socket.socket,
    services: Services,
    tls: NodeIdentity | None,
    nginx: tuple[str, Path] | None,
    follow: Callable[[Callable[[int], None]], None],
    domain: str | None,
    workers: int,
) -> None:
    """The API port: hypercorn on ``sock`` itself, or (``nginx``: its binary and prefix dir,
    ``--data-plane nginx``) a supervised nginx that owns ``sock`` with the agent served behind
    it on a private unix socket; ``follow`` registers what reacts to applied entries."""
    ingress = services.ingress
    if nginx is None or ingress is None:
        await serve(nursery, sock, services, tls)
        return
    binary, prefix = nginx
    plane = NginxPlane(
        binary,
        prefix,
        ingress,
        tls=(tls.files.cert, tls.files.key) if tls else None,
        domain=domain,
        workers=workers,
    )
    await serve(nursery, plane.agent_socket(), services, None, lambda app: front(app, ingress))
    await nursery.start(plane.run, sock)
    follow(plane.notify)
