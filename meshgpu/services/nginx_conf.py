"""The nginx configuration of the nginx data plane (``nginx.py``), rendered from the ingress's
routes (pure: text in, text out).

nginx owns the API port. What it serves natively, per service with at least one ready replica
(path routing ``/proxy/services/<project>/<run>/`` and, with a domain, ``<run>.<domain>``): an
``upstream`` of the ready replicas (``least_conn``, pooled keep-alive, HTTP/1.1, WebSocket
upgrades), auth through ``auth_request`` to the agent with the verdict cached for 60 s (as
dstack's gateway does), ``rate_limits`` as ``limit_req`` zones, a 64 MiB body limit, a 300 s
upstream timeout, and an access log line per request (service id, status, seconds) the agent
reads for the autoscaler's counters and ``/metrics``.

Everything else goes to the agent's own server (the API, the model endpoint, a service with no
ready replica: activation holds requests there, one stopping, and anything that does not look
the way this file expects -- an encoded name, a path prefix or header name that is not plain).
Only plain names, prefixes and addresses ever reach the text: the rest falls back to the agent,
so nothing a run's configuration says can add a directive.

Retries: ``proxy_next_upstream error`` -- another replica is tried when a connection cannot be
made, or breaks before the response header arrives; nginx never passes a non-idempotent request
(POST, PATCH, LOCK) to another replica once it was sent (since nginx 1.9.13), so a chat
completion is never sent twice; an idempotent one (GET, HEAD, PUT, DELETE) may be, when the
replica failed before it answered. Timeouts are not retried."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshgpu.services.routing import DEFAULT_PROJECT, name_ok

if TYPE_CHECKING:
    from meshgpu.services.routing import Route

AUTH_PATH = "/_meshgpu/nginx/auth"  # the agent's verdict on a bearer token (internal)
FRONT_CLIENT = "X-Meshgpu-Client"  # what nginx says the client's address and scheme are
FRONT_SCHEME = "X-Meshgpu-Scheme"
AUTH_CACHE_S = 60
BODY_LIMIT_MB = 64
UPSTREAM_TIMEOUT_S = 300
KEEPALIVE = 64
# What may appear in a rate limit's path prefix, a header name, a file path.
_PREFIX = re.compile(r"^/[A-Za-z0-9._~/-]{0,200}$")
_HEADER = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_UNSAFE_PATH = re.compile(r'["\\$;{}\s\x00-\x1f\x7f]')
# A service path as the client sent it: "<project>/<run>" and the rest with its query.
_RAW = (
    "~^/proxy/services/(?<mg_s>[A-Za-z0-9][A-Za-z0-9_-]*/[A-Za-z0-9][A-Za-z0-9_-]*)"
    "(?<mg_r>/[^?]*(\\?.*)?)$"
)


class UnsafePath(ValueError):
    """A file path nginx's configuration cannot name safely (quotes, ``$``, spaces...)."""


@dataclass(frozen=True, slots=True)
class Plane:
    """Where things are: nginx's own directory, the API address it serves (taken from the
    agent's listening socket, which nginx inherits), the agent's private socket."""

    prefix: str  # nginx's directory (conf, pid, logs, temp, cache): 0700
    listen: str  # "127.0.0.1:7480" or "[::]:7480"
    agent_socket: str  # the agent's hypercorn, on a unix socket inside ``prefix``
    access_log: str
    tls: tuple[str, str] | None = None  # certificate, key
    domain: str | None = None
    workers: int = 1
    user: str | None = None  # "user group" when nginx runs as root (workers stay as we are)
    nofile: int = 16384
    worker_connections: int = 8192
    dual_stack: bool = False  # listen on [::] with ipv6only=off

    def check(self) -> None:
        for path in (self.prefix, self.agent_socket, self.access_log, *(self.tls or ())):
            if _UNSAFE_PATH.search(path):
                raise UnsafePath(
                    f"nginx cannot be given the path {path!r} (quotes, '$', ';', braces or "
                    "spaces): use a --data-dir without them"
                )


def service_id(run_id: str) -> str:
    """A service's name in the config and the access log: derived from its run id, never the
    run's text."""
    return "s" + hashlib.sha256(run_id.encode()).hexdigest()[:16]


def native(route: Route) -> bool:
    """Whether nginx serves ``route`` itself (else the agent does)."""
    if not (route.active and route.replicas):
        return False
    if not (name_ok(route.project.encode()) and name_ok(route.run_name.encode())):
        return False
    for replica in route.replicas:
        try:
            ipaddress.ip_address(replica.host)
        except ValueError:
            return False
        if not 0 < replica.port < 65536:
            return False
    for rule in route.service.rate_limits:
        if not _PREFIX.match(rule.prefix) or not rule.rps > 0 or rule.burst < 0:
            return False
        if rule.key == "header" and not _HEADER.match(rule.header or ""):
            return False
    return True


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _rate(rps: float) -> str:
    if rps >= 1 and float(rps).is_integer():
        return f"{int(rps)}r/s"
    return f"{max(1, round(rps * 60))}r/m"


def _zone(sid: str, i: int) -> str:
    return f"{sid}_rl{i}"


def render(plane: Plane, routes: list[Route]) -> str:
    """The whole ``nginx.conf``: the same routes give the same text (no reload without a
    change)."""
    plane.check()
    served = sorted((r for r in routes if native(r)), key=lambda r: (r.project, r.run_name))
    p = plane.prefix
    out: list[str] = [
        "# Written by the meshgpu agent (meshgpu/services/nginx_conf.py): changes are lost.",
        "daemon off;",
        "master_process on;",
        f"worker_processes {plane.workers};",
        f"worker_rlimit_nofile {plane.nofile};",
        "worker_shutdown_timeout 330s;",
        f'pid "{p}/nginx.pid";',
        f'error_log "{p}/error.log" warn;',
    ]
    if plane.user:
        out.append(f"user {plane.user};")
    out += [
        f"events {{ worker_connections {plane.worker_connections}; multi_accept on; }}",
        "http {",
        "  access_log off;",
        "  server_tokens off;",
        "  default_type application/octet-stream;",
        "  tcp_nodelay on;",
        "  keepalive_timeout 75s;",
        "  keepalive_requests 100000;",
        "  server_names_hash_bucket_size 128;",
        "  server_names_hash_max_size 65536;",
        "  variables_hash_bucket_size 128;",
        f'  client_body_temp_path "{p}/tmp/body";',
        f'  proxy_temp_path "{p}/tmp/proxy";',
        f'  fastcgi_temp_path "{p}/tmp/fastcgi";',
        f'  uwsgi_temp_path "{p}/tmp/uwsgi";',
        f'  scgi_temp_path "{p}/tmp/scgi";',
        f'  proxy_cache_path "{p}/cache/auth" levels=1:2 keys_zone=mg_auth:4m max_size=64m '
        "inactive=120s use_temp_path=off;",
        "  limit_req_status 429;",
        "  limit_req_log_level warn;",
        '  map $http_upgrade $mg_connection { default upgrade; "" ""; }',
        '  map $http_host $mg_host { "" $host; default $http_host; }',
        # The path after /proxy/services/<project>/<run> as the client sent it (still encoded:
        # %2F stays %2F), with its query; "" when it is not that plain shape (the agent says why).
        "  map $request_uri $mg_rest {",
        '    default "";',
        f'    "{_RAW}" $mg_r;',
        "  }",
        "  map $request_uri $mg_svcpath {",
        '    default "";',
        f'    "{_RAW}" $mg_s;',
        "  }",
        "  log_format mg_svc '$mg_sid $status $request_time';",
        "  upstream meshgpu_agent {",
        f'    server "unix:{plane.agent_socket}";',
        "    keepalive 32;",
        "  }",
    ]
    for route in served:
        sid = service_id(route.run_id)
        for i, rule in enumerate(route.service.rate_limits):
            key = (
                f'"k$http_{(rule.header or "").lower().replace("-", "_")}"'
                if rule.key == "header"
                else "$binary_remote_addr"
            )
            out.append(f"  limit_req_zone {key} zone={_zone(sid, i)}:1m rate={_rate(rule.rps)};")
        out.append(f"  upstream {sid} {{")
        out.append("    least_conn;")
        for replica in route.replicas:
            out.append(f"    server {_address(replica.host, replica.port)} max_fails=0;")
        out.append(f"    keepalive {KEEPALIVE};")
        out.append("    keepalive_timeout 60s;")
        out.append("  }")

    listen = f"{plane.listen}{' ipv6only=off' if plane.dual_stack else ''}"
    ssl = " ssl" if plane.tls else ""
    out += ["  server {", f"    listen {listen}{ssl} default_server;", "    server_name _;"]
    out += _server_common(plane)
    for route in served:
        # Without the trailing slash: the agent (nginx would answer 301).
        out += [f"    location = /proxy/services/{route.project}/{route.run_name} {{"]
        out += [*_to_agent(), "    }"]
        out += _service_location(
            route,
            f"/proxy/services/{route.project}/{route.run_name}/",
            path_routed=True,
            log=plane.access_log,
        )
    out.append("  }")
    if plane.domain:
        for route in served:
            if route.project != DEFAULT_PROJECT:
                continue
            out += [
                "  server {",
                f"    listen {plane.listen}{ssl};",
                f"    server_name {route.run_name}.{plane.domain};",
            ]
            out += _server_common(plane)
            out += _service_location(route, "/", path_routed=False, log=plane.access_log)
            out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def _server_common(plane: Plane) -> list[str]:
    lines = []
    if plane.tls:
        cert, key = plane.tls
        lines += [
            f'    ssl_certificate "{cert}";',
            f'    ssl_certificate_key "{key}";',
            "    ssl_protocols TLSv1.2 TLSv1.3;",
            "    ssl_session_cache shared:mg_tls:4m;",
        ]
    lines += [
        # Declares the variables the service locations set (never run: a server-level ``set``
        # would also run in the auth subrequest, which shares the request's variables).
        "    location = /_meshgpu/declare {",
        "      internal;",
        '      set $mg_sid "-";',
        "      set $mg_project main;",
        "      return 404;",
        "    }",
        "    client_header_buffer_size 4k;",
        "    large_client_header_buffers 8 32k;",
        # The catch-all: the agent (the API, the model endpoint, activation, what is odd).
        "    location / {",
        *_to_agent(),
        "    }",
        "    location @mg_agent {",
        *_to_agent(),
        "    }",
        "    location ^~ /_meshgpu/ { return 404; }",
        f"    location = {AUTH_PATH} {{",
        "      internal;",
        f"      proxy_pass http://meshgpu_agent{AUTH_PATH}?project=$mg_project;",
        "      proxy_http_version 1.1;",
        '      proxy_set_header Connection "";',
        "      proxy_method GET;",
        "      proxy_pass_request_body off;",
        '      proxy_set_header Content-Length "";',
        "      proxy_set_header Authorization $http_authorization;",
        "      proxy_cache mg_auth;",
        "      proxy_cache_methods GET HEAD POST;",
        '      proxy_cache_key "$mg_project $http_authorization";',
        f"      proxy_cache_valid 200 {AUTH_CACHE_S}s;",
        "      proxy_ignore_headers Cache-Control Expires Set-Cookie Vary;",
        "    }",
        "    location @mg_401 {",
        "      access_log off;",
        "      default_type application/problem+json;",
        "      add_header WWW-Authenticate 'Bearer realm=\"meshgpu\"' always;",
        "      return 401 '"
        + _problem(
            401,
            "unauthorized",
            "send Authorization: Bearer <token> (the cluster's API token)",
            "unauthorized",
        )
        + "';",
        "    }",
        "    location @mg_429 {",
        '      access_log "' + plane.access_log + '" mg_svc buffer=64k flush=1s;',
        "      default_type application/problem+json;",
        "      add_header Retry-After 1 always;",
        "      return 429 '"
        + _problem(429, "too many requests", "over the service's rate limit", "rate_limited")
        + "';",
        "    }",
        "    location @mg_413 {",
        "      access_log off;",
        "      default_type application/problem+json;",
        "      return 413 '"
        + _problem(
            413, "request too large", f"over the {BODY_LIMIT_MB << 20} byte limit", "too_large"
        )
        + "';",
        "    }",
        "    location @mg_502 {",
        '      access_log "' + plane.access_log + '" mg_svc buffer=64k flush=1s;',
        "      default_type application/problem+json;",
        "      return 502 '"
        + _problem(502, "bad gateway", "no replica answered", "bad_gateway")
        + "';",
        "    }",
    ]
    return lines


def _problem(status: int, title: str, detail: str, code: str) -> str:
    # JSON inside a single-quoted nginx string: none of these texts hold a quote or backslash.
    return (
        f'{{"type":"about:blank","title":"{title}","status":{status},'
        f'"detail":"{detail.replace(chr(39), "")}","code":"{code}"}}'
    )


def _to_agent() -> list[str]:
    return [
        "      proxy_pass http://meshgpu_agent;",
        "      proxy_http_version 1.1;",
        "      proxy_set_header Connection $mg_connection;",
        "      proxy_set_header Upgrade $http_upgrade;",
        "      proxy_set_header Host $mg_host;",
        f"      proxy_set_header {FRONT_CLIENT} $remote_addr;",
        f"      proxy_set_header {FRONT_SCHEME} $scheme;",
        "      proxy_buffering off;",
        "      proxy_request_buffering off;",
        "      proxy_cache off;",
        "      client_max_body_size 0;",
        "      proxy_read_timeout 1d;",
        "      proxy_send_timeout 1d;",
    ]


def _service_location(route: Route, location: str, path_routed: bool, log: str) -> list[str]:
    service = route.service
    sid = service_id(route.run_id)
    base = location if path_routed else ""
    lines = [f"    location {location} {{"]
    lines += _service_body(route, sid, path_routed, log, indent="      ")
    # Rate limits: the rule with the longest prefix of the path after the service's applies
    # (nginx picks the longest matching nested location).
    for i, rule in enumerate(service.rate_limits):
        nested = base.rstrip("/") + rule.prefix if path_routed else rule.prefix
        if nested == location:
            lines.insert(1, f"      limit_req zone={_zone(sid, i)} burst={rule.burst} nodelay;")
            continue
        lines.append(f"      location {nested} {{")
        lines.append(f"        limit_req zone={_zone(sid, i)} burst={rule.burst} nodelay;")
        lines += _service_body(route, sid, path_routed, log, indent="        ")
        lines.append("      }")
    lines.append("    }")
    return lines


def _service_body(route: Route, sid: str, path_routed: bool, log: str, indent: str) -> list[str]:
    service = route.service
    lines = [f"set $mg_sid {sid};", f"set $mg_project {route.project};"]
    if path_routed:
        # The location matched the decoded, normalized path: what the client sent must name
        # this very service plainly, else the agent answers (it reads the raw path).
        lines.append(f'if ($mg_svcpath != "{route.project}/{route.run_name}") {{ return 418; }}')
    if path_routed and service.strip_prefix:
        lines.append(f"proxy_pass http://{sid}$mg_rest;")
    else:
        lines.append(f"proxy_pass http://{sid};")
    lines.append(f'access_log "{log}" mg_svc buffer=64k flush=1s;')
    if service.auth:
        lines.append(f"auth_request {AUTH_PATH};")
    lines += [
        "error_page 418 = @mg_agent;",
        "error_page 401 = @mg_401;",
        "error_page 429 = @mg_429;",
        "error_page 413 = @mg_413;",
        "error_page 502 = @mg_502;",
        "proxy_http_version 1.1;",
        "proxy_set_header Connection $mg_connection;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Host $mg_host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_set_header X-Forwarded-Host $mg_host;",
        f"proxy_set_header {FRONT_CLIENT} '';",
        f"proxy_set_header {FRONT_SCHEME} '';",
        "proxy_buffering off;",
        "proxy_request_buffering off;",
        "proxy_cache off;",
        "proxy_next_upstream error;",
        "proxy_connect_timeout 10s;",
        f"proxy_read_timeout {UPSTREAM_TIMEOUT_S}s;",
        f"proxy_send_timeout {UPSTREAM_TIMEOUT_S}s;",
        f"client_max_body_size {BODY_LIMIT_MB}m;",
    ]
    return [indent + line for line in lines if line]


__all__ = [
    "AUTH_CACHE_S",
    "AUTH_PATH",
    "FRONT_CLIENT",
    "FRONT_SCHEME",
    "Plane",
    "UnsafePath",
    "native",
    "render",
    "service_id",
]
