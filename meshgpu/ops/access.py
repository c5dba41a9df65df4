"""Users, projects, members, user tokens, secrets and the audit trail as use cases. Every one
takes the caller (``Principal``) and asks the policy (``meshgpu/security/policy.py``) first: a
project the caller may not see is ``NotFound`` (as if it did not exist), one it sees but may not
change is ``Denied``.

Secrets: the value is encrypted here, under the cluster data key, before it is proposed; only
ciphertext enters the log. The data key is opened with the CA key, which voters hold: a
learner answers ``Unavailable`` naming what to do. A job's host gets the values it needs at
job start from a voter over the peer port (``resolve_for_job``), never through the API.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from cryptography.exceptions import InvalidTag

from meshgpu.config.interpolation import secret_names
from meshgpu.errors import Conflict, Denied, Invalid, NotFound, Unavailable, run_not_found
from meshgpu.security import policy
from meshgpu.security.policy import Principal
from meshgpu.security.secrets import (
    MAX_SECRET_BYTES,
    UserToken,
    decrypt,
    encrypt,
    new_data_key,
)
from meshgpu.state.access import (
    ADMIN,
    NAME,
    SECRET_NAME,
    CreateProject,
    CreateUser,
    DeleteProject,
    DeleteSecret,
    DeleteUser,
    InstallDataKey,
    IssueUserToken,
    RemoveProjectMember,
    RevokeUserToken,
    SetProjectMember,
    SetProjectQuota,
    SetSecret,
)
from meshgpu.state.cluster import encode_cluster

if TYPE_CHECKING:
    from meshgpu.replica.proposer import Proposer
    from meshgpu.state import StateMachine
    from meshgpu.state.cluster import ClusterState

log = logging.getLogger(__name__)

MAX_TOKEN_TTL_S = 3 * 366 * 86400.0


def _check_name(kind: str, name: str, pattern: str = NAME) -> None:
    import re

    if not re.match(pattern, name):
        raise Invalid(
            f"invalid {kind} name",
            f"{name!r}: use lowercase letters, digits, - and _ (at most 40, starting with a "
            "letter or digit)"
            if pattern == NAME
            else f"{name!r}: use letters, digits, _ and - (at most 64, not starting with a digit)",
            "invalid_name",
        )


class AccessOps:
    def __init__(
        self,
        proposer: Proposer,
        cluster: ClusterState,
        state: StateMachine,
        ca_pem: Callable[[], bytes],
        ca_key_path: Path | None,
    ) -> None:
        self.proposer, self.cluster, self.state = proposer, cluster, state
        self.ca_pem, self.ca_key_path = ca_pem, ca_key_path
        self._keys: dict[str, bytes] = {}  # opened data keys, by id (voters only)
        # Values that did not open while re-encrypting (project, name, ciphertext): skipped.
        self._unopenable: set[tuple[str, str, str]] = set()

    @property
    def access(self) -> Any:
        return self.cluster.access

    async def _propose(self, cmd: Any, what: str) -> Any:
        result = await self.proposer.propose(encode_cluster(cmd))
        if not result.ok:
            kind = {"not_found": NotFound, "exists": Conflict, "invalid": Invalid}.get(
                result.code, Conflict
            )
            raise kind(what, result.error, result.code)
        return result.value

    # -- who can see what ----------------------------------------------------------------------

    def see(self, who: Principal, project: str) -> None:
        """``NotFound`` unless the caller may see ``project``."""
        if not policy.visible(self.access, who, project):
            raise NotFound(
                "project not found",
                f"no project {project!r} of yours; see meshgpu project ls",
                "not_found",
            )

    def require(self, who: Principal, action: str, project: str) -> None:
        self.see(who, project)
        if not policy.allowed(self.access, who, action, project):
            role = policy.role(self.access, who, project)
            raise Denied(
                "not allowed",
                f"{who.user} is a {role} of project {project}, which may not do this "
                f"({action}); ask a project admin or manager",
                "forbidden",
            )

    def see_run(self, who: Principal, name: str, action: str = "project.read") -> Any:
        """The run, if the caller may see its project (else the same ``NotFound`` as for no
        such run) and do ``action`` there (else ``Denied``)."""
        run = self.state.runs.get(name)
        if run is None or not policy.visible(self.access, who, run.project):
            raise run_not_found(name)
        if not policy.allowed(self.access, who, action, run.project):
            raise Denied(
                "not allowed",
                f"{who.user} may not {action.split('.')[1]} runs of project {run.project}",
                "forbidden",
            )
        return run

    def require_global(self, who: Principal, action: str) -> None:
        if not policy.allowed_global(who, action):
            raise Denied("not allowed", f"{who.user} is no global admin ({action})", "forbidden")

    # -- users ---------------------------------------------------------------------------------

    def me(self, who: Principal) -> dict[str, Any]:
        return {
            "user": who.user,
            "global_role": who.global_role,
            "projects": {
                p: policy.role(self.access, who, p)
                for p in policy.visible_projects(self.access, who)
            },
        }

    def list_users(self, who: Principal) -> list[dict[str, Any]]:
        users = [{"name": ADMIN, "global_role": "admin", "created_at": 0.0}] + [
            u.model_dump() for u in sorted(self.access.users.values(), key=lambda u: u.name)
        ]
        if not who.is_admin:
            users = [u for u in users if u["name"] == who.user]
        for u in users:
            u["tokens"] = [
                {"token_id": t.token_id, "created_at": t.created_at, "expires_at": t.expires_at}
                for t in self.access.tokens.values()
                if t.user == u["name"]
            ]
        return users

    async def create_user(self, who: Principal, name: str, global_role: str) -> dict[str, Any]:
        self.require_global(who, "user.manage")
        _check_name("user", name)
        await self._propose(
            CreateUser(at=time.time(), name=name, global_role=global_role, by=who.user),  # type: ignore[arg-type]
            "user not created",
        )
        return {"name": name, "global_role": global_role}

    async def delete_user(self, who: Principal, name: str) -> None:
        self.require_global(who, "user.manage")
        await self._propose(DeleteUser(at=time.time(), name=name, by=who.user), "user not removed")

    async def issue_token(self, who: Principal, user: str, ttl_s: float | None) -> dict[str, Any]:
        """A new API token for ``user`` (the caller's own, or any for a global admin): shown
        once; only its verifier is stored."""
        if user != who.user:
            self.require_global(who, "user.manage")
        if user == ADMIN:
            raise Invalid(
                "the founding admin has its own token",
                "create a user with global role admin (meshgpu user create NAME --admin) and "
                "issue tokens to it",
                "invalid",
            )
        token = UserToken.create()
        expires = time.time() + ttl_s if ttl_s else None
        await self._propose(
            IssueUserToken(
                at=time.time(),
                user=user,
                token_id=token.token_id,
                verifier=token.verifier(),
                expires_at=expires,
                by=who.user,
            ),
            "token not issued",
        )
        return {
            "token": str(token),
            "token_id": token.token_id,
            "user": user,
            "expires_at": expires,
        }

    async def revoke_token(self, who: Principal, token_id: str) -> None:
        tok = self.access.tokens.get(token_id)
        if tok is None or (tok.user != who.user and not who.is_admin):
            raise NotFound("token not found", f"no token {token_id} of yours", "not_found")
        await self._propose(
            RevokeUserToken(at=time.time(), token_id=token_id, by=who.user), "token not revoked"
        )

    # -- projects ------------------------------------------------------------------------------

    def list_projects(self, who: Principal) -> list[dict[str, Any]]:
        usage = project_gpus(self.state)
        out = []
        for name in policy.visible_projects(self.access, who):
            p = self.access.projects.get(name)
            out.append(
                {
                    "name": name,
                    "role": policy.role(self.access, who, name),
                    "members": dict(p.members) if p is not None else {},
                    "max_gpus": p.max_gpus if p is not None else None,
                    "gpus_in_use": usage.get(name, 0),
                    "active_runs": sum(
                        1
                        for r in self.state.runs.values()
                        if r.project == name and not r.status.is_finished()
                    ),
                }
            )
        return out

    async def create_project(
        self, who: Principal, name: str, max_gpus: int | None
    ) -> dict[str, Any]:
        self.require_global(who, "project.create")
        _check_name("project", name)
        await self._propose(
            CreateProject(at=time.time(), name=name, owner=who.user, max_gpus=max_gpus),
            "project not created",
        )
        return {"name": name, "max_gpus": max_gpus}

    async def set_quota(self, who: Principal, name: str, max_gpus: int | None) -> None:
        self.require(who, "project.manage", name)
        await self._propose(
            SetProjectQuota(at=time.time(), name=name, max_gpus=max_gpus, by=who.user),
            "quota not set",
        )

    async def delete_project(self, who: Principal, name: str) -> None:
        self.require(who, "project.manage", name)
        active = [
            r.run_name
            for r in self.state.runs.values()
            if r.project == name and not r.status.is_finished()
        ]
        if active:
            raise Conflict(
                "project has active runs",
                f"stop them first: {', '.join(sorted(active)[:5])}",
                "active_runs",
            )
        fleets = sorted(f.name for f in self.cluster.fleets.fleets.values() if f.project == name)
        if fleets:
            raise Conflict(
                "project has fleets",
                f"delete them first (meshgpu fleet delete NAME): {', '.join(fleets[:5])}",
                "has_fleets",
            )
        await self._propose(
            DeleteProject(at=time.time(), name=name, by=who.user), "project not removed"
        )

    async def set_member(self, who: Principal, project: str, user: str, role: str) -> None:
        self.see(who, project)
        current = self.access.role_in(user, project)
        if not policy.may_grant(self.access, who, project, role, current):
            raise Denied(
                "not allowed",
                f"only a project admin may make or unmake admins; managers add users and "
                f"managers ({who.user} is a {policy.role(self.access, who, project)})",
                "forbidden",
            )
        await self._propose(
            SetProjectMember(at=time.time(), project=project, user=user, role=role, by=who.user),  # type: ignore[arg-type]
            "member not added",
        )

    async def remove_member(self, who: Principal, project: str, user: str) -> None:
        self.see(who, project)
        current = self.access.role_in(user, project)
        if not policy.may_grant(self.access, who, project, current or "user", current):
            raise Denied(
                "not allowed", "only project admins and managers remove members", "forbidden"
            )
        await self._propose(
            RemoveProjectMember(at=time.time(), project=project, user=user, by=who.user),
            "member not removed",
        )

    # -- audit ---------------------------------------------------------------------------------

    def audit(
        self, who: Principal, project: str | None, since: float | None, limit: int
    ) -> list[dict[str, Any]]:
        if project is not None:
            self.require(who, "audit.read", project)
        entries = self.access.audit_log
        out = []
        for a in reversed(entries):
            if since is not None and a.at < since:
                break
            if project is not None and a.project != project:
                continue
            if (
                project is None
                and not who.is_admin
                and not (a.project and policy.allowed(self.access, who, "audit.read", a.project))
            ):
                continue
            out.append(a.model_dump())
            if len(out) >= limit:
                break
        out.reverse()
        return out

    # -- secrets -------------------------------------------------------------------------------

    def _data_key(self, key_id: str) -> bytes:
        """An installed data key, opened with this voter's CA key."""
        key = self._keys.get(key_id)
        if key is not None:
            return key
        sealed = self.access.data_keys.get(key_id)
        if sealed is None:
            raise Unavailable("unknown data key", f"data key {key_id} is not installed", "stale")
        if self.ca_key_path is None or not self.ca_key_path.exists():
            raise Unavailable(
                "secrets need a voter",
                "this member holds no CA key (it is no voter), so it cannot open secrets: send "
                "the request to a voter (meshgpu status lists them)",
                "not_a_voter",
            )
        from cryptography.hazmat.primitives import serialization

        from meshgpu.security import unseal

        ca_key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        key = unseal(bytes.fromhex(sealed), ca_key)  # type: ignore[arg-type]
        self._keys[key_id] = key
        return key

    async def _primary_key(self) -> tuple[str, bytes]:
        if not self.access.primary_key:
            from meshgpu.security import seal

            key_id, key = new_data_key()
            sealed = await trio.to_thread.run_sync(seal, key, self.ca_pem())
            await self.proposer.propose(
                encode_cluster(
                    InstallDataKey(at=time.time(), key_id=key_id, sealed_hex=sealed.hex())
                )
            )
            if self.access.primary_key == key_id:
                self._keys[key_id] = key
        key_id = self.access.primary_key
        return key_id, await trio.to_thread.run_sync(self._data_key, key_id)

    def list_secrets(self, who: Principal, project: str) -> list[dict[str, Any]]:
        self.require(who, "project.read", project)
        return [
            {"name": s.name, "updated_at": s.updated_at, "updated_by": s.updated_by}
            for (p, _), s in sorted(self.access.secrets.items())
            if p == project
        ]

    async def set_secret(
        self, who: Principal, project: str, name: str, value: str
    ) -> dict[str, Any]:
        self.require(who, "secret.manage", project)
        _check_name("secret", name, SECRET_NAME)
        data = value.encode()
        if len(data) > MAX_SECRET_BYTES:
            raise Invalid("secret too large", f"at most {MAX_SECRET_BYTES} bytes", "too_large")
        for attempt in range(3):
            key_id, key = await self._primary_key()
            blob = encrypt(key, project, name, data)
            cmd = SetSecret(
                at=time.time(),
                project=project,
                name=name,
                key_id=key_id,
                ciphertext_hex=blob.hex(),
                by=who.user,
            )
            result = await self.proposer.propose(encode_cluster(cmd))
            if result.ok:
                return {"name": name, "project": project}
            if result.code != "stale" or attempt == 2:
                break
            # The key was rotated and retired meanwhile: encrypt under the new one.
        kind = NotFound if result.code == "not_found" else Conflict
        raise kind("secret not set", result.error, result.code)

    # -- data key rotation ---------------------------------------------------------------------

    async def rotate_key(self, who: Principal) -> dict[str, Any]:
        """A new cluster data key (global admins): new values are encrypted under it at once;
        the leader re-encrypts the stored ones in the background (``reencrypt``), and the old
        key goes when no value uses it."""
        self.require_global(who, "secret.rotate_key")
        if not self.access.primary_key:
            key_id, _ = await self._primary_key()  # the first key: nothing to re-encrypt
            return {"key_id": key_id, "to_reencrypt": 0}
        from meshgpu.security import seal

        key_id, key = new_data_key()
        sealed = await trio.to_thread.run_sync(seal, key, self.ca_pem())
        self._keys[key_id] = key
        await self._propose(
            InstallDataKey(
                at=time.time(), key_id=key_id, sealed_hex=sealed.hex(), rotate=True, by=who.user
            ),
            "key not rotated",
        )
        pending = sum(n for k, n in self.access.key_uses.items() if k != key_id)
        return {"key_id": key_id, "to_reencrypt": pending}

    def key_status(self) -> dict[str, Any]:
        access = self.access
        return {
            "primary_key": access.primary_key,
            "keys": {k: access.key_uses.get(k, 0) for k in sorted(access.data_keys)},
            "to_reencrypt": sum(n for k, n in access.key_uses.items() if k != access.primary_key),
        }

    async def reencrypt(self, batch: int = 64) -> int:
        """Re-encrypt up to ``batch`` values stored under an older key with the primary one
        (the leader's ``SecretKeys`` controller calls it). Each is proposed with
        ``if_ciphertext``, so a ``secret set`` that lands first wins; the proposals of a batch
        go together. Returns how many were re-encrypted."""
        access = self.access
        skip = self._unopenable
        stale = [
            s
            for s in access.stale_secrets(batch + len(skip))
            if (s.project, s.name, s.ciphertext_hex) not in skip
        ][:batch]
        if not stale:
            return 0
        primary = access.primary_key

        def seal_all() -> list[SetSecret]:
            key = self._data_key(primary)
            out = []
            for s in stale:
                old = bytes.fromhex(s.ciphertext_hex)
                try:
                    value = decrypt(self._data_key(s.key_id), s.project, s.name, old)
                except InvalidTag:
                    # Stays under its key (which stays too) until set again; said once.
                    log.error(
                        "secret %s of project %s does not open: not re-encrypted", s.name, s.project
                    )
                    skip.add((s.project, s.name, s.ciphertext_hex))
                    continue
                out.append(
                    SetSecret(
                        at=time.time(),
                        project=s.project,
                        name=s.name,
                        key_id=primary,
                        ciphertext_hex=encrypt(key, s.project, s.name, value).hex(),
                        by=s.updated_by,
                        if_ciphertext=s.ciphertext_hex,
                    )
                )
            return out

        cmds = await trio.to_thread.run_sync(seal_all)
        done = 0

        async def one(cmd: SetSecret) -> None:
            nonlocal done
            result = await self.proposer.propose(encode_cluster(cmd))
            done += bool(result.ok)

        async with trio.open_nursery() as nursery:
            for cmd in cmds:
                nursery.start_soon(one, cmd)
        return done

    def _open(self, project: str, name: str) -> str:
        s = self.access.secrets.get((project, name))
        if s is None:
            raise NotFound(
                "secret not found", f"no secret {name} in project {project}", "not_found"
            )
        try:
            return decrypt(
                self._data_key(s.key_id), project, name, bytes.fromhex(s.ciphertext_hex)
            ).decode()
        except InvalidTag:
            raise Unavailable(
                "secret unreadable", f"{name} does not open under its key", "corrupt"
            ) from None

    async def get_secret(self, who: Principal, project: str, name: str) -> dict[str, Any]:
        self.require(who, "secret.read", project)
        value = await trio.to_thread.run_sync(self._open, project, name)
        return {"name": name, "project": project, "value": value}

    async def delete_secret(self, who: Principal, project: str, name: str) -> None:
        self.require(who, "secret.manage", project)
        await self._propose(
            DeleteSecret(at=time.time(), project=project, name=name, by=who.user),
            "secret not removed",
        )

    def check_references(self, project: str, names: list[str]) -> None:
        """At submission: every ``${{ secrets.X }}`` names a secret of the run's project."""
        missing = sorted({n for n in names if (project, n) not in self.access.secrets})
        if missing:
            raise Invalid(
                "unknown secrets",
                f"project {project} has no secret {', '.join(missing)}: set it with "
                f"meshgpu secret set {missing[0]} --project {project}",
                "unknown_secret",
            )

    async def resolve_for_job(self, caller_node_id: str, job_id: str) -> dict[str, str]:
        """The secret values a job needs, for the host that runs it (the peer call
        ``secrets``): only the job's own host, only its run's project, only what its
        configuration references."""
        job = self.state.jobs.get(job_id)
        if job is None or job.node_id != caller_node_id:
            raise Denied("not your job", f"job {job_id} is not assigned to the caller", "denied")
        run = self.state.runs.get(job.run_name)
        if run is None:
            raise NotFound("run not found", job.run_name, "not_found")
        names = secret_names(run.config)

        def open_all() -> dict[str, str]:
            return {n: self._open(run.project, n) for n in names}

        return await trio.to_thread.run_sync(open_all)


def project_gpus(state: StateMachine) -> dict[str, int]:
    """GPUs held now by each project's jobs (what fair share counts)."""
    usage: dict[str, int] = {}
    for job in state.active.values():
        if job.gpu_indices and job.status.holds_resources():
            run = state.runs.get(job.run_name)
            if run is not None:
                usage[run.project] = usage.get(run.project, 0) + len(job.gpu_indices)
    return usage
