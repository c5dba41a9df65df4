"""``/api/v1/fleets``: SSH fleets (``meshgpu apply -f fleet.yml``, ``meshgpu fleet ...``)."""

from typing import TYPE_CHECKING, Annotated, Any

import trio
from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from meshgpu.api import problems
from meshgpu.api.problems import Problem
from meshgpu.errors import Denied
from meshgpu.security import policy
from meshgpu.state.access import DEFAULT_PROJECT

if TYPE_CHECKING:
    from meshgpu.ops import Services


class FleetBody(BaseModel):
    configuration: str = Field(max_length=256 << 10, description="The fleet file's YAML")
    filename: str = Field(default="fleet.yml", max_length=4096)
    identities: dict[str, str] = Field(
        default_factory=dict,
        description="identity_file path (as written in the file) -> the private key's text; "
        "sealed to the voters before it is stored",
    )


Setting = Annotated[str, Field(max_length=4096)]


class BackendBody(BaseModel):
    name: str = Field(max_length=41)
    type: str = Field(max_length=64, description="The plugin (meshgpu.backends entry point)")
    config: dict[Annotated[str, Field(max_length=64)], Setting] = Field(default_factory=dict)
    secrets: dict[Annotated[str, Field(max_length=64)], Setting] = Field(
        default_factory=dict, description="Credentials: sealed to the voters before stored"
    )


def router(
    services: "Services",  # noqa: UP037 - see app.py
    auth: Any,
    read: Any,
    project_header: Any,  # app.py's ``X-Meshgpu-Project`` (default main)
) -> APIRouter:
    r = APIRouter()
    ProjectHeader = project_header  # noqa: N806

    def fleets() -> Any:
        if services.fleets is None:
            raise Problem(503, "fleets unavailable", "this node serves no fleets", "unavailable")
        return services.fleets

    @r.post(
        "/api/v1/fleets",
        status_code=201,
        responses=problems.responses(400, 403, 404, 409, 503, 507),
    )
    async def apply_fleet(
        body: FleetBody, who: auth, project: ProjectHeader = None
    ) -> dict[str, Any]:
        """Create or change a fleet of the project (``X-Meshgpu-Project``; default main); the
        leader brings its hosts in (and out). It takes the project's admin (or a global one);
        another project's project is not found (404)."""
        return await fleets().apply(
            body.configuration,
            body.filename,
            body.identities,
            who=who,
            project=project or DEFAULT_PROJECT,
        )

    @r.get("/api/v1/fleets")
    async def list_fleets(who: auth, __: read) -> list[dict[str, Any]]:
        """The fleets of the projects the caller may see (a global admin: all)."""
        return fleets().list(who)  # type: ignore[no-any-return]

    @r.get("/api/v1/fleets/{name}", responses=problems.responses(404))
    async def get_fleet(name: str, who: auth, __: read) -> dict[str, Any]:
        """A fleet; one of a project the caller may not see is not found (404)."""
        return fleets().get(name, who)  # type: ignore[no-any-return]

    @r.delete("/api/v1/fleets/{name}", responses=problems.responses(403, 404, 503, 507))
    async def delete_fleet(
        name: str,
        who: auth,
        host: Annotated[list[str] | None, Query(description="Only these hosts")] = None,
    ) -> dict[str, Any]:
        """Drain and remove the fleet's hosts (or only ``host``), then the fleet: its project's
        admin (or a global one); a fleet of a project the caller may not see is not found."""
        return await fleets().delete(name, host or [], who)  # type: ignore[no-any-return]

    def admin(who: Any) -> None:
        """Backends spend the mesh's money and hold cloud credentials: global admins only."""
        if not policy.allowed_global(who, "cluster.manage"):
            raise Denied("not allowed", f"{who.user} is no global admin (backends)", "forbidden")

    def backends() -> Any:
        if services.backends is None:
            raise Problem(
                503, "backends unavailable", "this node serves no backends", "unavailable"
            )
        return services.backends

    @r.post("/api/v1/backends", status_code=201, responses=problems.responses(400, 403, 503, 507))
    async def add_backend(body: BackendBody, who: auth) -> dict[str, Any]:
        """Configure a backend (global admins): its credentials are checked, then sealed to
        the voters."""
        admin(who)
        return await backends().add(body.name, body.type, body.config, body.secrets)

    @r.get("/api/v1/backends")
    async def list_backends(_: auth, __: read) -> list[dict[str, Any]]:
        return backends().list()

    @r.delete("/api/v1/backends/{name}", responses=problems.responses(403, 404, 409, 503, 507))
    async def remove_backend(name: str, who: auth) -> dict[str, Any]:
        """Remove a backend with no instances (global admins)."""
        admin(who)
        return await backends().remove(name)

    @r.get("/api/v1/agent/meshgpu.pyz", responses=problems.responses(403, 503))
    async def agent_file(
        x_meshgpu_download: Annotated[
            str,
            Header(
                max_length=256,
                description="The download secret in the instance's user data (not the API "
                "token): good for one instance until it joins",
            ),
        ] = "",
    ) -> StreamingResponse:
        """The agent file, for an instance a backend fleet is booting (its user data fetches
        it over TLS pinned to the cluster CA). Streamed from disk in a worker thread, a few
        downloads at a time."""
        from meshgpu.ops.backends import MAX_AGENT_FILE

        b = backends()
        b.download_allowed(x_meshgpu_download)
        path = await b.agent_path()
        f = await trio.to_thread.run_sync(path.open, "rb")
        try:
            size = await trio.to_thread.run_sync(lambda: path.stat().st_size)
        except OSError:
            f.close()
            raise
        if size > MAX_AGENT_FILE:
            f.close()
            raise Problem(503, "agent file too large", f"{path} is {size} bytes", "unavailable")

        async def chunks() -> Any:
            try:
                async with b.downloads:
                    left = size
                    while left > 0:
                        data = await trio.to_thread.run_sync(f.read, min(1 << 20, left))
                        if not data:
                            break
                        left -= len(data)
                        yield data
            finally:
                f.close()

        return StreamingResponse(
            chunks(),
            media_type="application/zip",
            headers={"Content-Length": str(size), "Cache-Control": "no-store"},
        )

    return r
