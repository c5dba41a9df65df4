"""HTTP client for a node's REST API (``/api/v1``), synchronous for the CLI and scripts."""

from __future__ import annotations

import os
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


class APIError(Exception):
    """A problem-details error from the API (or a transport failure), ready to show a user."""

    def __init__(self, status: int, title: str, detail: str = "", code: str = "") -> None:
        super().__init__(f"{title}: {detail}" if detail else title)
        self.status, self.title, self.detail, self.code = status, title, detail, code


@dataclass(frozen=True)
class Profile:
    url: str
    token: str


def default_config_path() -> Path:
    return Path(os.environ.get("MESHGPU_CONFIG") or Path.home() / ".meshgpu" / "client.toml")


def load_profile(url: str | None = None, token: str | None = None) -> Profile:
    """``--url``/``MESHGPU_URL`` and ``MESHGPU_TOKEN`` win over the client profile file."""
    data: dict[str, Any] = {}
    path = default_config_path()
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise APIError(0, f"cannot read the client profile {path}", str(e)) from None
    url = url or os.environ.get("MESHGPU_URL") or data.get("url")
    token = token or os.environ.get("MESHGPU_TOKEN") or data.get("token")
    if not url:
        raise APIError(
            0,
            "no meshgpu node to talk to",
            f"start an agent (meshgpu agent) or pass --url / set MESHGPU_URL; looked for {path}",
        )
    return Profile(url.rstrip("/"), token or "")


def write_profile(path: Path, url: str, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f'url = "{url}"\ntoken = "{token}"\n')
    tmp.chmod(0o600)
    tmp.replace(path)


class Client:
    def __init__(self, profile: Profile, timeout: float = 30.0) -> None:
        self.profile = profile
        self._http = httpx.Client(
            base_url=profile.url,
            headers={"Authorization": f"Bearer {profile.token}"} if profile.token else {},
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise APIError(
                0, f"cannot reach {self.profile.url}", f"{type(e).__name__}: {e}"
            ) from None
        if r.status_code >= 400:
            try:
                doc = r.json()
            except ValueError:
                doc = {"title": r.reason_phrase, "detail": r.text[:500]}
            raise APIError(
                r.status_code, doc.get("title", "error"), doc.get("detail", ""), doc.get("code", "")
            )
        return r

    # -- endpoints ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self._request("GET", "/api/v1/status").json()

    def nodes(self) -> list[dict[str, Any]]:
        return self._request("GET", "/api/v1/nodes").json()["nodes"]

    def runs(self, all: bool = False) -> list[dict[str, Any]]:
        return self._request("GET", "/api/v1/runs", params={"all": str(all).lower()}).json()["runs"]

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

    def offers(self, **params: Any) -> dict[str, Any]:
        """``GET /api/v1/offers``: ``gpu``, ``cpu``, ``memory``, ``disk``, ``shm_size``,
        ``resources`` (JSON text), ``nodes``, ``fleet`` (a list), ``after_queue``."""
        query = {k: v for k, v in params.items() if v is not None}
        if "after_queue" in query:
            query["after_queue"] = str(bool(query["after_queue"])).lower()
        return self._request("GET", "/api/v1/offers", params=query).json()

    def offers_for(
        self, config_text: str, filename: str = "<config>", **overrides: Any
    ) -> dict[str, Any]:
        """``POST /api/v1/offers``: offers for a run configuration (``gpu``, ``cpu``,
        ``memory``, ``disk``, ``nodes``, ``after_queue`` override or add)."""
        body = {"config": config_text, "filename": filename}
        body |= {k: v for k, v in overrides.items() if v is not None}
        return self._request("POST", "/api/v1/offers", json=body).json()

    def run_metrics(self, name: str, job: int | None = None) -> dict[str, Any]:
        """CPU, memory and GPU use of a run's jobs, sampled on the hosts that run them."""
        params = {"job": job} if job is not None else {}
        return self._request("GET", f"/api/v1/runs/{name}/metrics", params=params).json()

    def prometheus(self) -> str:
        """The node's ``/metrics`` page (Prometheus text format)."""
        return self._request("GET", "/metrics").text
