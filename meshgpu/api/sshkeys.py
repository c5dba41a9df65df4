"""``/api/v1/ssh/keys``: users' SSH public keys for the SSH server in every agent (``meshgpu
attach`` registers its key here). A key's fingerprint (``SHA256:...``, as ``ssh-keygen -l``
prints it) names it; in a path it may be URL-encoded, with or without the ``SHA256:`` prefix."""

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from meshgpu.api import problems
from meshgpu.api.problems import Problem

if TYPE_CHECKING:
    from meshgpu.ops import Services


class SSHKeyBody(BaseModel):
    public_key: str = Field(
        max_length=16 << 10,
        description="One OpenSSH public key line: 'ssh-ed25519 AAAA... [comment]'",
    )
    name: str = Field(default="", max_length=200, description="A label (default: the comment)")


class SSHKeyView(BaseModel):
    fingerprint: str
    public_key: str
    name: str
    user: str
    added_at: float


def router(services: "Services", auth: Any, read: Any) -> APIRouter:  # noqa: UP037 - see app.py
    r = APIRouter()

    def keys() -> Any:
        if services.ssh_keys is None:
            raise Problem(
                503, "SSH keys unavailable", "this node serves no SSH keys", "unavailable"
            )
        return services.ssh_keys

    @r.post(
        "/api/v1/ssh/keys",
        status_code=201,
        response_model=SSHKeyView,
        responses=problems.responses(400, 503, 507),
    )
    async def add_ssh_key(body: SSHKeyBody, who: auth) -> dict[str, Any]:
        """Register a public key as the caller's: it opens sessions into the jobs of the
        projects the caller may attach to (the same key again is no error: it keeps its first
        name and user)."""
        return await keys().add(body.public_key, body.name, user=who.user)

    @r.get("/api/v1/ssh/keys", response_model=list[SSHKeyView])
    async def list_ssh_keys(who: auth, __: read) -> list[dict[str, Any]]:
        """The caller's keys (a global admin: everyone's)."""
        return [k for k in keys().list() if who.is_admin or k["user"] == who.user]

    @r.delete("/api/v1/ssh/keys/{fingerprint:path}", responses=problems.responses(404, 503, 507))
    async def remove_ssh_key(fingerprint: str, who: auth) -> dict[str, Any]:
        await keys().remove(fingerprint, None if who.is_admin else who.user)
        return {"removed": fingerprint}

    return r
