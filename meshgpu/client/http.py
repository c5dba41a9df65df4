"""HTTP client for a node's REST API (``/api/v1``), synchronous for the CLI and scripts."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx

from meshgpu.client.profile import (
    MEMBERS_HEADER,
    PAGE_MAX,
    APIError,
    Profile,
    default_config_path,
    load_profile,
    write_profile,
)

__all__ = [
    "MEMBERS_HEADER",
    "PAGE_MAX",
    "APIError",
    "Client",
    "Profile",
    "default_config_path",
    "load_profile",
    "write_profile",
]


def _plain_url(u: str) -> bool:
    """An http(s) URL with a host and nothing that could break the profile file."""
    try:
        url = httpx.URL(u)
    except (httpx.InvalidURL, ValueError):
        return False
    return url.scheme in ("http", "https") and bool(url.host) and not set('"\\\n') & set(u)


class Client:
    """One node's API, with the others as fallbacks: a request that cannot reach a node (or
    gets no answer) is sent to the next member it knows. Every write carries what makes it
    idempotent (submissions a request id; stop, priority and code uploads are idempotent by
    nature), so a retry on another node never does the thing twice."""

    def __init__(self, profile: Profile, timeout: float = 30.0) -> None:
        self.profile = profile
        self._urls = [profile.url, *profile.members]
        headers = {"Authorization": f"Bearer {profile.token}"} if profile.token else {}
        if profile.project:
            headers[PROJECT_HEADER] = profile.project
        self._http = httpx.Client(
            base_url=profile.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=5.0),
            verify=profile.verify(),
        )

    @property
    def url(self) -> str:
        """The node this client talks to now."""
        return str(self._http.base_url).rstrip("/")

    def close(self) -> None:
        self._http.close()

    def _learn_members(self, r: httpx.Response) -> None:
        header = r.headers.get(MEMBERS_HEADER) if r.is_success else None
        if not header:
            return
        members = [u for u in header.split(",") if _plain_url(u) and u != self.url]
        known = [u for u in self._urls if u != self.url]
        if set(members) <= set(known):
            return
        self._urls = [self.url, *dict.fromkeys([*members, *known])]
        p = self.profile
        if p.path is not None and self.url == p.url:
            try:
                write_profile(
                    p.path, p.url, p.token, tuple(self._urls[1:]), p.ca, _file_project(p.path)
                )
            except OSError:
                pass  # a read-only profile: the members are only remembered for this process

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        failures: list[str] = []
        r = None
        for _ in range(len(self._urls)):
            try:
                r = self._http.request(method, path, **kw)
                break
            except httpx.TransportError as e:
                failures.append(f"{self.url}: {type(e).__name__}: {e}")
                if not self._next_member():
                    break
        if r is None:
            raise APIError(
                0,
                f"cannot reach {self.profile.url}"
                + (" nor any other member it knows" if len(self._urls) > 1 else ""),
                "; ".join(failures),
            )
        self._learn_members(r)
        if r.status_code >= 400:
            try:
                doc = r.json()
            except ValueError:
                doc = {"title": r.reason_phrase, "detail": r.text[:500]}
            raise APIError(
                r.status_code, doc.get("title", "error"), doc.get("detail", ""), doc.get("code", "")
            )
        return r

    def _next_member(self) -> bool:
        """Talk to the next member from now on; False if there is no other."""
        if len(self._urls) < 2:
            return False
        i = self._urls.index(self.url) if self.url in self._urls else -1
        self._http.base_url = httpx.URL(self._urls[(i + 1) % len(self._urls)])
        return True

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """Any API call: its JSON answer (``APIError`` on a problem)."""
        return self._request(method, path, **kw).json()

    # -- endpoints ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self._request("GET", "/api/v1/status").json()

    def nodes(self) -> list[dict[str, Any]]:
        """Every host, newest first (all pages)."""
        return self._collect("/api/v1/nodes", "nodes", {}, None)

    def runs_page(
        self, *, all: bool = False, limit: int = 100, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of runs, newest first: ``runs`` (without configurations) and
        ``next_cursor`` (None at the end). ``all``: finished runs too."""
        params: dict[str, Any] = {"all": str(all).lower(), "limit": limit}
        if cursor:
            params["cursor"] = cursor
        return self._request("GET", "/api/v1/runs", params=params).json()

    def runs(self, all: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
        """Runs newest first, without configurations (``run`` has one): active ones, or every
        one with ``all``; at most ``limit`` (None: every page)."""
        return self._collect("/api/v1/runs", "runs", {"all": str(all).lower()}, limit)

    def _collect(
        self, path: str, key: str, params: dict[str, Any], limit: int | None
    ) -> list[dict[str, Any]]:
        """The items of a paginated list, following ``next_cursor`` (a cursor is good at any
        member, so a fallback to another node mid-way carries on where it was)."""
        items: list[dict[str, Any]] = []
        cursor = None
        while limit is None or len(items) < limit:
            size = PAGE_MAX if limit is None else min(PAGE_MAX, limit - len(items))
            query = params | {"limit": size} | ({"cursor": cursor} if cursor else {})
            doc = self._request("GET", path, params=query).json()
            items += doc[key]
            cursor = doc.get("next_cursor")
            if not cursor:
                break
        return items

    def run(self, name: str, consistent: bool = False) -> dict[str, Any]:
        return self._request(
            "GET", f"/api/v1/runs/{name}", params={"consistent": str(consistent).lower()}
        ).json()

    def upload_code(self, data: bytes, sha256: str) -> dict[str, Any]:
        return self._request(
            "POST",
            "/api/v1/code",
            content=data,
            headers={"Content-Type": "application/gzip", "X-Content-SHA256": sha256},
        ).json()

    def submit(
        self,
        config_text: str,
        *,
        name: str | None = None,
        run_args: list[str] | None = None,
        code_sha256: str | None = None,
        request_id: str | None = None,
        filename: str = "<config>",
    ) -> dict[str, Any]:
        body = {
            "config": config_text,
            "filename": filename,
            "name": name,
            "run_args": run_args or [],
            "code_sha256": code_sha256,
            "request_id": request_id or uuid.uuid4().hex,
        }
        return self._request("POST", "/api/v1/runs", json=body).json()

    def set_priority(self, name: str, priority: int) -> dict[str, Any]:
        """Change an active run's priority in place (0..100)."""
        return self._request("PATCH", f"/api/v1/runs/{name}", json={"priority": priority}).json()

    def stop(self, name: str, abort: bool = False) -> dict[str, Any]:
        return self._request("POST", f"/api/v1/runs/{name}/stop", json={"abort": abort}).json()

    def logs(self, name: str, job: int = 0, follow: bool = False) -> Iterator[bytes]:
        params = {"job": job, "follow": str(follow).lower()}
        try:
            with self._http.stream(
                "GET", f"/api/v1/runs/{name}/logs", params=params, timeout=None
            ) as r:
                if r.status_code >= 400:
                    r.read()
                    doc = r.json()
                    raise APIError(r.status_code, doc.get("title", "error"), doc.get("detail", ""))
                yield from r.iter_bytes()
        except httpx.TransportError as e:
            raise APIError(0, f"log stream from {self.profile.url} broke", str(e)) from None

    def add_ssh_key(self, public_key: str, name: str) -> dict[str, Any]:
        """Register a user's SSH public key (``POST /api/v1/ssh/keys``): ``{fingerprint}``."""
        return self._request(
            "POST", "/api/v1/ssh/keys", json={"public_key": public_key, "name": name}
        ).json()

    def offers(self, **params: Any) -> dict[str, Any]:
        """``GET /api/v1/offers``: ``gpu``, ``cpu``, ``memory``, ``disk``, ``shm_size``,
        ``resources`` (JSON text), ``nodes``, ``fleet`` (a list), ``after_queue``."""
        query = {k: v for k, v in params.items() if v is not None}
        for flag in ("after_queue", "backends"):
            if flag in query:
                query[flag] = str(bool(query[flag])).lower()
        return self._request("GET", "/api/v1/offers", params=query).json()

    def offers_for(
        self, config_text: str, filename: str = "<config>", **overrides: Any
    ) -> dict[str, Any]:
        """``POST /api/v1/offers``: offers for a run configuration (``gpu``, ``cpu``,
        ``memory``, ``disk``, ``nodes``, ``after_queue`` override or add)."""
        body = {"config": config_text, "filename": filename}
        body |= {k: v for k, v in overrides.items() if v is not None}
        return self._request("POST", "/api/v1/offers", json=body).json()

    def run_history(
        self, name: str, since_s: float, job: int | None = None, points: int | None = None
    ) -> dict[str, Any]:
        """A run's metrics history (``GET /api/v1/runs/{name}/history``)."""
        params: dict[str, Any] = {"since_s": since_s}
        if job is not None:
            params["job"] = job
        if points is not None:
            params["points"] = points
        return self._request("GET", f"/api/v1/runs/{name}/history", params=params).json()

    def run_metrics(self, name: str, job: int | None = None) -> dict[str, Any]:
        """CPU, memory and GPU use of a run's jobs, sampled on the hosts that run them."""
        params = {"job": job} if job is not None else {}
        return self._request("GET", f"/api/v1/runs/{name}/metrics", params=params).json()

    def prometheus(self) -> str:
        """The node's ``/metrics`` page (Prometheus text format)."""
        return self._request("GET", "/metrics").text


PROJECT_HEADER = "X-Meshgpu-Project"


def _file_project(path: Any) -> str | None:
    """The ``project`` the profile file itself names (kept when it is rewritten)."""
    import tomllib

    try:
        value = tomllib.loads(path.read_text()).get("project")
    except (OSError, ValueError):
        return None
    return str(value) if value else None
