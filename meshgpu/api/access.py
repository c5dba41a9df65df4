"""``/api/v1/users``, ``/api/v1/projects`` (members, quota), ``/api/v1/projects/{p}/secrets``
and ``/api/v1/audit``: the use cases of ``meshgpu/ops/access.py``, each with the caller."""

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from meshgpu.api import problems
from meshgpu.api.problems import Problem
from meshgpu.ops.access import MAX_TOKEN_TTL_S
from meshgpu.security.secrets import MAX_SECRET_BYTES

if TYPE_CHECKING:
    from meshgpu.ops import Services

Name = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[a-z0-9][a-z0-9_-]*$")]
SecretName = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
]


class UserBody(BaseModel):
    name: Name
    global_role: Literal["admin", "user"] = "user"


class TokenBody(BaseModel):
    ttl_s: float = Field(
        default=0, ge=0, le=MAX_TOKEN_TTL_S, description="Seconds until it expires; 0: never"
    )


class ProjectBody(BaseModel):
    name: Name
    max_gpus: int | None = Field(default=None, ge=0, le=1 << 20)


class QuotaBody(BaseModel):
    max_gpus: int | None = Field(default=None, ge=0, le=1 << 20, description="null: no quota")


class MemberBody(BaseModel):
    user: Name
    role: Literal["admin", "manager", "user"] = "user"


class SecretBody(BaseModel):
    value: str = Field(max_length=MAX_SECRET_BYTES)


def router(services: "Services", auth: Any, read: Any) -> APIRouter:  # noqa: UP037 - see app.py
    r = APIRouter()

    def ops() -> Any:
        if services.access is None:
            raise Problem(503, "access unavailable", "this node serves no users", "unavailable")
        return services.access

    @r.get("/api/v1/me")
    async def me(who: auth) -> dict[str, Any]:
        """The caller: its user, global role and its projects with its role in each."""
        return ops().me(who)

    @r.get("/api/v1/users")
    async def list_users(who: auth, _: read) -> list[dict[str, Any]]:
        """Users and their token ids (a global admin sees all; others themselves)."""
        return ops().list_users(who)

    @r.post("/api/v1/users", status_code=201, responses=problems.responses(400, 403, 409, 503, 507))
    async def create_user(body: UserBody, who: auth) -> dict[str, Any]:
        return await ops().create_user(who, body.name, body.global_role)

    @r.delete("/api/v1/users/{name}", responses=problems.responses(400, 403, 404, 503, 507))
    async def delete_user(name: str, who: auth) -> dict[str, Any]:
        await ops().delete_user(who, name)
        return {"removed": name}

    @r.post(
        "/api/v1/users/{name}/tokens",
        status_code=201,
        responses=problems.responses(400, 403, 404, 503, 507),
    )
    async def issue_token(name: str, body: TokenBody, who: auth) -> dict[str, Any]:
        """A new API token for the user (shown once: only its verifier is stored)."""
        return await ops().issue_token(who, name, body.ttl_s or None)

    @r.delete("/api/v1/user-tokens/{token_id}", responses=problems.responses(404, 503, 507))
    async def revoke_token(token_id: str, who: auth) -> dict[str, Any]:
        """Revoke a user token (refused on every member once the entry applies)."""
        await ops().revoke_token(who, token_id)
        return {"revoked": token_id}

    @r.get("/api/v1/projects")
    async def list_projects(who: auth, _: read) -> list[dict[str, Any]]:
        """The projects the caller sees: its role, members, quota and GPUs in use."""
        return ops().list_projects(who)

    @r.post(
        "/api/v1/projects", status_code=201, responses=problems.responses(400, 403, 409, 503, 507)
    )
    async def create_project(body: ProjectBody, who: auth) -> dict[str, Any]:
        return await ops().create_project(who, body.name, body.max_gpus)

    @r.delete("/api/v1/projects/{name}", responses=problems.responses(400, 403, 404, 409, 503, 507))
    async def delete_project(name: str, who: auth) -> dict[str, Any]:
        await ops().delete_project(who, name)
        return {"removed": name}

    @r.put("/api/v1/projects/{name}/quota", responses=problems.responses(403, 404, 503, 507))
    async def set_quota(name: str, body: QuotaBody, who: auth) -> dict[str, Any]:
        await ops().set_quota(who, name, body.max_gpus)
        return {"name": name, "max_gpus": body.max_gpus}

    @r.post(
        "/api/v1/projects/{name}/members", responses=problems.responses(403, 404, 409, 503, 507)
    )
    async def add_member(name: str, body: MemberBody, who: auth) -> dict[str, Any]:
        """Add a member (or change its role)."""
        await ops().set_member(who, name, body.user, body.role)
        return {"project": name, "user": body.user, "role": body.role}

    @r.delete(
        "/api/v1/projects/{name}/members/{user}", responses=problems.responses(403, 404, 503, 507)
    )
    async def remove_member(name: str, user: str, who: auth) -> dict[str, Any]:
        await ops().remove_member(who, name, user)
        return {"project": name, "removed": user}

    @r.get("/api/v1/projects/{name}/secrets", responses=problems.responses(404))
    async def list_secrets(name: str, who: auth, _: read) -> list[dict[str, Any]]:
        """The project's secret names (never their values)."""
        return ops().list_secrets(who, name)

    @r.put(
        "/api/v1/projects/{name}/secrets/{secret}",
        responses=problems.responses(400, 403, 404, 503, 507),
    )
    async def set_secret(name: str, secret: str, body: SecretBody, who: auth) -> dict[str, Any]:
        """Set a secret: encrypted on this node before anything is replicated."""
        return await ops().set_secret(who, name, secret, body.value)

    @r.get("/api/v1/projects/{name}/secrets/{secret}", responses=problems.responses(403, 404, 503))
    async def get_secret(name: str, secret: str, who: auth) -> dict[str, Any]:
        """A secret's value (project admins and managers)."""
        return await ops().get_secret(who, name, secret)

    @r.delete(
        "/api/v1/projects/{name}/secrets/{secret}",
        responses=problems.responses(403, 404, 503, 507),
    )
    async def delete_secret(name: str, secret: str, who: auth) -> dict[str, Any]:
        await ops().delete_secret(who, name, secret)
        return {"removed": secret}

    @r.post("/api/v1/secrets/rotate-key", responses=problems.responses(403, 503, 507))
    async def rotate_key(who: auth) -> dict[str, Any]:
        """A new cluster data key (global admins): values are re-encrypted in the background
        on the leader; the old key goes when no value uses it."""
        return await ops().rotate_key(who)

    @r.get("/api/v1/secrets/keys", responses=problems.responses(403))
    async def key_status(who: auth, _: read) -> dict[str, Any]:
        """The data keys (ids only), how many values each holds, and how many are left to
        re-encrypt (global admins)."""
        ops().require_global(who, "secret.rotate_key")
        return ops().key_status()

    @r.get("/api/v1/audit", responses=problems.responses(403, 404))
    async def audit(
        who: auth,
        _: read,
        project: Annotated[str | None, Query(max_length=40)] = None,
        since: Annotated[float | None, Query(ge=0, description="Seconds since the epoch")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> list[dict[str, Any]]:
        """Who did what (submit, stop, secret set, member add, ...), oldest first."""
        return ops().audit(who, project, since, limit)

    return r
