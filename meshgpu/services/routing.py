"""Where an ingress request goes: the service a path or a Host header names, and the replicas
that may receive its traffic, read from the replicated state (pure: no I/O).

* ``/proxy/services/<project>/<run>/<rest>``: the run's path prefix (stripped before the request
  is forwarded unless the service says ``strip_prefix: false``);
* ``<run>.<domain>`` (an agent started with ``--ingress-domain``): project ``main``, the whole
  path forwarded.

A replica receives traffic iff its job is RUNNING and ready (TERMINATING jobs never: that is
the drain); it is reached at its host's internal IP (127.0.0.1 on this node) and the service
port. Routes are derived once per applied index: the per-request cost is a dict lookup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshgpu.state.records import JobStatus, RunStatus

if TYPE_CHECKING:
    from meshgpu.config.spec import ServiceSpec
    from meshgpu.state import StateMachine

SERVICES_PREFIX = b"/proxy/services/"
MODELS_PREFIX = b"/proxy/models/"
DEFAULT_PROJECT = "main"
LOOPBACK = "127.0.0.1"
# A project or run name as it may appear in a path segment or a host label: plain characters,
# no dots of its own ('.' and '..' are path tricks), no percent-encoding (encoded slashes).
_NAME = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
# A Host header: a DNS name or an IPv4 address, or a bracketed IPv6 address, and a port.
_HOST = re.compile(
    rb"^(?:[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$"
)


class BadRequest(ValueError):
    """A path or Host header that names no service in a way we can read (400)."""


@dataclass(frozen=True, slots=True)
class Target:
    """What a request names: the service, and the path to forward (raw, query excluded)."""

    project: str
    run: str
    prefix: bytes  # the part of the path that names the service (b"" for host routing)
    rest: bytes  # the path after it, starting with "/"


@dataclass(frozen=True, slots=True)
class Replica:
    job_id: str
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class Route:
    """A service as the ingress sees it at one applied index."""

    run_id: str
    run_name: str
    project: str
    service: ServiceSpec
    replicas: tuple[Replica, ...]
    active: bool  # submitted and not stopping: a request may wait for a replica
    stopping: bool  # TERMINATING: answered 503 at once


def name_ok(segment: bytes) -> bool:
    return bool(_NAME.match(segment))


def parse_path(raw_path: bytes, prefix: bytes = SERVICES_PREFIX) -> Target:
    """``/proxy/services/<project>/<run>[/rest]`` (``raw_path`` as the client sent it, still
    percent-encoded). A malformed name is a ``BadRequest``."""
    tail = raw_path[len(prefix) :]
    project, _, tail = tail.partition(b"/")
    run, slash, rest = tail.partition(b"/")
    for what, segment in ((b"project", project), (b"service", run)):
        if not segment:
            raise BadRequest(f"the path names no {what.decode()}: /proxy/services/<project>/<run>/")
        if not _NAME.match(segment):
            raise BadRequest(
                f"{segment.decode('latin-1')!r} is not a {what.decode()} name "
                "(letters, digits, '-' and '_'; no dots or encoded characters)"
            )
    return Target(
        project.decode(),
        run.decode(),
        raw_path[: len(prefix) + len(project) + 1 + len(run)],
        b"/" + rest if slash else b"/",
    )


def host_of(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The Host header, lower-cased and checked; None when there is none. Two of them, or one
    that is not a host name or address with an optional port, is a ``BadRequest``."""
    found = None
    for k, v in headers:
        if k == b"host":
            if found is not None:
                raise BadRequest("more than one Host header")
            found = v
    if found is None:
        return None
    if not _HOST.match(found):
        raise BadRequest(f"malformed Host header {found[:100].decode('latin-1')!r}")
    return found.lower()


def run_from_host(host: bytes, domain: bytes) -> bytes | None:
    """``<run>.<domain>[:port]`` -> run name (None when the host is not under ``domain``, which
    is already lower-case and dot-less at the ends). A name that is not a run name -- more
    labels, an empty one -- is a ``BadRequest``."""
    if host.startswith(b"["):
        return None
    name = host.rpartition(b":")[0] if b":" in host else host
    name = name.rstrip(b".")
    suffix = b"." + domain
    if not name.endswith(suffix):
        return None
    label = name[: -len(suffix)]
    if not _NAME.match(label):
        raise BadRequest(
            f"{label.decode('latin-1')!r} is not a service name under {domain.decode()} "
            "(one label: letters, digits, '-')"
        )
    return label


class RouteTable:
    """Routes derived from the state, rebuilt lazily when the applied index moved on."""

    def __init__(self, state: StateMachine, node_id: str) -> None:
        self.state = state
        self.node_id = node_id
        self._index = -1
        self._routes: dict[tuple[str, str], Route | None] = {}

    def fresh(self) -> None:
        if self.state.applied_index != self._index:
            self._index = self.state.applied_index
            self._routes = {}

    def get(self, project: str, run: str) -> Route | None:
        """The service ``run`` of ``project`` (None: no such run, or not a service)."""
        if self.state.applied_index != self._index:
            self.fresh()
        key = (project, run)
        try:
            return self._routes[key]
        except KeyError:
            route = self._routes[key] = self._build(project, run)
            return route

    def _build(self, project: str, run_name: str) -> Route | None:
        state = self.state
        run = state.runs.get(run_name)
        if run is None or run.project != project or run.spec.service is None:
            return None
        service = run.spec.service
        replicas = []
        for job_id in run.job_ids:
            job = state.jobs.get(job_id)
            if job is None or job.status != JobStatus.RUNNING or not job.ready:
                continue
            if job.node_id == self.node_id:
                host = LOOPBACK
            else:
                node = state.nodes.get(job.node_id or "")
                if node is None or not node.internal_ip:
                    continue
                host = node.internal_ip
            replicas.append(Replica(job_id, host, service.port))
        status = run.status
        return Route(
            run_id=run.run_id,
            run_name=run.run_name,
            project=run.project,
            service=service,
            replicas=tuple(replicas),
            active=not status.is_finished() and status != RunStatus.TERMINATING,
            stopping=status == RunStatus.TERMINATING,
        )

    def services(self, project: str) -> list[Route]:
        """The project's services (active ones first come as the state holds them)."""
        out = []
        for run in list(self.state.runs.values()):
            if run.project == project and run.spec.service is not None:
                route = self.get(project, run.run_name)
                if route is not None:
                    out.append(route)
        return out

    def addresses(self) -> set[tuple[str, int]]:
        """Every replica address that receives traffic now (for dropping idle connections)."""
        out: set[tuple[str, int]] = set()
        for run in list(self.state.runs.values()):
            if run.spec.service is None or run.status.is_finished():
                continue
            route = self.get(run.project, run.run_name)
            if route is not None:
                out.update(r.address for r in route.replicas)
        return out


__all__ = [
    "DEFAULT_PROJECT",
    "MODELS_PREFIX",
    "SERVICES_PREFIX",
    "BadRequest",
    "Replica",
    "Route",
    "RouteTable",
    "Target",
    "host_of",
    "name_ok",
    "parse_path",
    "run_from_host",
]
