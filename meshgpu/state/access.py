"""Users, projects, roles, API tokens, secrets and the audit trail in the replicated state.

Part of ``ClusterState`` (the ``cluster`` domain), like the fleets. Deterministic: every member
reaches the same records from the same entries. What is stored is never usable on its own:

- a user's API token enters as its *verifier* (SHA-256 of the token; the token is 32 random
  bytes, so a fast hash is enough), looked up by that hash on every request;
- a secret enters as AES-256-GCM ciphertext under the cluster *data key*, with the project and
  name as associated data (``meshgpu/security/secrets.py``); the data key itself enters sealed
  to the cluster CA's public key, which only the voters (who hold the CA key) can open.

The founding agent's admin token (``ClusterState.api_token_hash``) is the implicit user
``admin``, a global admin that always exists.

Who may do what is decided elsewhere (``meshgpu/security/policy.py``); apply only checks what a
concurrent entry could have changed (the project still exists, the user still exists).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from meshgpu.state.codec import Command

NAME = r"^[a-z0-9][a-z0-9_-]{0,39}$"
SECRET_NAME = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"
ADMIN = "admin"  # the founding admin (its token: ClusterState.api_token_hash)
DEFAULT_PROJECT = "main"
GlobalRole = Literal["admin", "user"]
ProjectRole = Literal["admin", "manager", "user"]
AUDIT_KEEP = 10_000  # the newest entries kept (deterministic trim on apply)


class _Cmd(Command):
    domain: ClassVar[str] = "cluster"


class CreateUser(_Cmd):
    kind: Literal["create_user"] = "create_user"
    name: str = Field(pattern=NAME)
    global_role: GlobalRole = "user"
    by: str = ADMIN


class DeleteUser(_Cmd):
    """The user, its tokens and its memberships go; its runs stay (they name it)."""

    kind: Literal["delete_user"] = "delete_user"
    name: str
    by: str = ADMIN


class IssueUserToken(_Cmd):
    kind: Literal["issue_user_token"] = "issue_user_token"
    user: str
    token_id: str = Field(pattern=r"^[0-9a-f]{8}$")
    verifier: str = Field(pattern=r"^[0-9a-f]{64}$")  # SHA-256 of the token
    expires_at: float | None = None
    by: str = ADMIN


class RevokeUserToken(_Cmd):
    kind: Literal["revoke_user_token"] = "revoke_user_token"
    token_id: str
    by: str = ADMIN


class CreateProject(_Cmd):
    kind: Literal["create_project"] = "create_project"
    name: str = Field(pattern=NAME)
    owner: str = ADMIN  # becomes the project's admin (unless the global admin)
    max_gpus: int | None = Field(default=None, ge=0)


class SetProjectQuota(_Cmd):
    kind: Literal["set_project_quota"] = "set_project_quota"
    name: str
    max_gpus: int | None = Field(default=None, ge=0)
    by: str = ADMIN


class DeleteProject(_Cmd):
    kind: Literal["delete_project"] = "delete_project"
    name: str
    by: str = ADMIN


class SetProjectMember(_Cmd):
    kind: Literal["set_project_member"] = "set_project_member"
    project: str
    user: str
    role: ProjectRole = "user"
    by: str = ADMIN


class RemoveProjectMember(_Cmd):
    kind: Literal["remove_project_member"] = "remove_project_member"
    project: str
    user: str
    by: str = ADMIN


class InstallDataKey(_Cmd):
    """The cluster data key (32 random bytes) sealed to the CA's public key. The first one
    wins: a second proposal (two members racing to make one) is refused, and its proposer uses
    the installed key. With ``rotate`` (``meshgpu secret rotate-key``) it becomes the primary
    key: new values are encrypted under it, the leader re-encrypts the others in the
    background (``SetSecret.if_ciphertext``), and an older key is dropped as soon as no value
    uses it."""

    kind: Literal["install_data_key"] = "install_data_key"
    key_id: str = Field(pattern=r"^[0-9a-f]{8}$")
    sealed_hex: str = Field(max_length=4096)
    rotate: bool = False  # a new primary key; the old ones stay until nothing uses them
    by: str = Field(default=ADMIN, exclude_if=lambda v: v == ADMIN)


class SetSecret(_Cmd):
    kind: Literal["set_secret"] = "set_secret"
    project: str
    name: str = Field(pattern=SECRET_NAME)
    key_id: str
    ciphertext_hex: str = Field(max_length=2 * (64 << 10) + 128)
    by: str = ADMIN
    # A background re-encryption under a new key: applied only if the value is still the one
    # it re-encrypted (a concurrent set wins), and not audited.
    if_ciphertext: str | None = None


class DeleteSecret(_Cmd):
    kind: Literal["delete_secret"] = "delete_secret"
    project: str
    name: str
    by: str = ADMIN


class AuditEvent(_Cmd):
    """What the jobs domain records (submit, stop) goes through ``Access.audit`` directly;
    this is for anything else a use case wants recorded."""

    kind: Literal["audit_event"] = "audit_event"
    action: str = Field(max_length=64)
    project: str = ""
    target: str = Field(default="", max_length=256)
    by: str = ADMIN


class User(BaseModel):
    name: str
    global_role: GlobalRole = "user"
    created_at: float = 0.0


class UserToken(BaseModel):
    token_id: str
    user: str
    verifier: str
    created_at: float = 0.0
    expires_at: float | None = None


class Project(BaseModel):
    name: str
    members: dict[str, ProjectRole] = Field(default_factory=dict)  # user -> role
    max_gpus: int | None = None
    created_at: float = 0.0
    owner: str = ADMIN


class Secret(BaseModel):
    project: str
    name: str
    key_id: str
    ciphertext_hex: str
    updated_at: float = 0.0
    updated_by: str = ADMIN


class Audit(BaseModel):
    at: float
    action: str
    project: str = ""
    target: str = ""
    user: str = ADMIN


Outcome = tuple[bool, Any, str, str]


def _ok(value: Any) -> Outcome:
    return True, value, "", ""


def _no(error: str, code: str = "not_found") -> Outcome:
    return False, None, error, code


class Access:
    """The access part of ``ClusterState``."""

    def __init__(self) -> None:
        self.users: dict[str, User] = {}
        self.tokens: dict[str, UserToken] = {}  # token id -> token
        self.by_verifier: dict[str, UserToken] = {}  # verifier -> token (the request path)
        self.projects: dict[str, Project] = {}
        self.secrets: dict[tuple[str, str], Secret] = {}
        self.data_keys: dict[str, str] = {}  # key id -> sealed key (hex)
        self.primary_key = ""
        self.key_uses: dict[str, int] = {}  # key id -> how many values use it (derived)
        self.audit_log: list[Audit] = []

    def empty(self) -> bool:
        return (
            not (self.users or self.tokens or self.projects or self.secrets or self.data_keys)
            and not self.audit_log
        )

    # -- reads ---------------------------------------------------------------------------------

    def role_in(self, user: str, project: str) -> str | None:
        p = self.projects.get(project)
        return None if p is None else p.members.get(user)

    def quota_of(self, project: str) -> int | None:
        p = self.projects.get(project)
        return None if p is None else p.max_gpus

    def quotas(self) -> dict[str, int]:
        """Project -> ``max_gpus``, for the projects that have one (the scheduler's input)."""
        return {n: p.max_gpus for n, p in self.projects.items() if p.max_gpus is not None}

    def stale_secrets(self, limit: int) -> list[Secret]:
        """Up to ``limit`` values under a key other than the primary one (to re-encrypt)."""
        if all(k == self.primary_key for k in self.key_uses):
            return []
        out = [s for s in self.secrets.values() if s.key_id != self.primary_key]
        out.sort(key=lambda s: (s.project, s.name))
        return out[:limit]

    def project_exists(self, name: str) -> bool:
        return name == DEFAULT_PROJECT or name in self.projects

    def user_exists(self, name: str) -> bool:
        return name == ADMIN or name in self.users

    # -- apply ---------------------------------------------------------------------------------

    def audit(self, at: float, action: str, user: str, project: str = "", target: str = "") -> None:
        self.audit_log.append(
            Audit(at=at, action=action, project=project, target=target, user=user)
        )
        if len(self.audit_log) > AUDIT_KEEP:
            del self.audit_log[: len(self.audit_log) - AUDIT_KEEP]

    def apply(self, c: Any) -> Outcome:
        return getattr(self, "_" + c.kind)(c)

    def _create_user(self, c: CreateUser) -> Outcome:
        if self.user_exists(c.name):
            return _no(f"user {c.name} exists", "exists")
        self.users[c.name] = User(name=c.name, global_role=c.global_role, created_at=c.at)
        self.audit(c.at, "user create", c.by, target=c.name)
        return _ok(c.name)

    def _delete_user(self, c: DeleteUser) -> Outcome:
        if c.name == ADMIN:
            return _no("the founding admin cannot be removed", "invalid")
        if self.users.pop(c.name, None) is None:
            return _no(f"no user {c.name}")
        for tid in [t for t, tok in self.tokens.items() if tok.user == c.name]:
            self.by_verifier.pop(self.tokens.pop(tid).verifier, None)
        for p in self.projects.values():
            p.members.pop(c.name, None)
        self.audit(c.at, "user rm", c.by, target=c.name)
        return _ok(c.name)

    def _issue_user_token(self, c: IssueUserToken) -> Outcome:
        if c.user not in self.users:
            return _no(f"no user {c.user}")
        if c.token_id in self.tokens or c.verifier in self.by_verifier:
            return _no("token id in use", "exists")
        tok = UserToken(
            token_id=c.token_id,
            user=c.user,
            verifier=c.verifier,
            created_at=c.at,
            expires_at=c.expires_at,
        )
        self.tokens[c.token_id] = tok
        self.by_verifier[c.verifier] = tok
        self.audit(c.at, "token create", c.by, target=f"{c.user}/{c.token_id}")
        return _ok(c.token_id)

    def _revoke_user_token(self, c: RevokeUserToken) -> Outcome:
        tok = self.tokens.pop(c.token_id, None)
        if tok is None:
            return _no(f"no token {c.token_id}")
        self.by_verifier.pop(tok.verifier, None)
        self.audit(c.at, "token revoke", c.by, target=f"{tok.user}/{c.token_id}")
        return _ok(c.token_id)

    def _create_project(self, c: CreateProject) -> Outcome:
        if self.project_exists(c.name):
            return _no(f"project {c.name} exists", "exists")
        members: dict[str, Any] = {}
        if c.owner != ADMIN and c.owner in self.users:
            members[c.owner] = "admin"
        self.projects[c.name] = Project(
            name=c.name, members=members, max_gpus=c.max_gpus, created_at=c.at, owner=c.owner
        )
        self.audit(c.at, "project create", c.owner, project=c.name)
        return _ok(c.name)

    def _set_project_quota(self, c: SetProjectQuota) -> Outcome:
        p = self._project(c.name)
        if p is None:
            return _no(f"no project {c.name}")
        p.max_gpus = c.max_gpus
        self.audit(c.at, "project quota", c.by, project=c.name, target=str(c.max_gpus))
        return _ok(c.name)

    def _project(self, name: str) -> Project | None:
        if name == DEFAULT_PROJECT and name not in self.projects:
            # ``main`` exists from the start; its record appears on its first change.
            self.projects[name] = Project(name=name)
        return self.projects.get(name)

    def _delete_project(self, c: DeleteProject) -> Outcome:
        if c.name == DEFAULT_PROJECT:
            return _no("the default project main cannot be removed", "invalid")
        if self.projects.pop(c.name, None) is None:
            return _no(f"no project {c.name}")
        for key in [k for k in self.secrets if k[0] == c.name]:
            self._use(self.secrets.pop(key).key_id, -1)
        self._prune_keys()
        self.audit(c.at, "project rm", c.by, project=c.name)
        return _ok(c.name)

    def _set_project_member(self, c: SetProjectMember) -> Outcome:
        if c.user not in self.users:
            return _no(f"no user {c.user}: create it first (meshgpu user create)")
        p = self._project(c.project)
        if p is None:
            return _no(f"no project {c.project}")
        p.members[c.user] = c.role
        self.audit(c.at, "member add", c.by, project=c.project, target=f"{c.user}:{c.role}")
        return _ok(c.user)

    def _remove_project_member(self, c: RemoveProjectMember) -> Outcome:
        p = self.projects.get(c.project)
        if p is None or p.members.pop(c.user, None) is None:
            return _no(f"{c.user} is not a member of {c.project}")
        self.audit(c.at, "member rm", c.by, project=c.project, target=c.user)
        return _ok(c.user)

    def _use(self, key_id: str, n: int) -> None:
        left = self.key_uses.get(key_id, 0) + n
        if left > 0:
            self.key_uses[key_id] = left
        else:
            self.key_uses.pop(key_id, None)

    def _prune_keys(self) -> None:
        """Drop every key but the primary one that no value uses any more."""
        for key_id in [k for k in self.data_keys if k != self.primary_key]:
            if key_id not in self.key_uses:
                del self.data_keys[key_id]

    def _install_data_key(self, c: InstallDataKey) -> Outcome:
        if c.key_id in self.data_keys:
            return _ok(c.key_id)
        if self.primary_key and not c.rotate:
            return _no("a data key is already installed", "exists")
        self.data_keys[c.key_id] = c.sealed_hex
        rotated = bool(self.primary_key)
        self.primary_key = c.key_id
        if rotated:
            self._prune_keys()
            self.audit(c.at, "data key rotate", c.by, target=c.key_id)
        return _ok(c.key_id)

    def _set_secret(self, c: SetSecret) -> Outcome:
        if c.key_id not in self.data_keys:
            return _no(f"unknown data key {c.key_id}", "stale")
        current = self.secrets.get((c.project, c.name))
        if c.if_ciphertext is not None:
            if current is None or current.ciphertext_hex != c.if_ciphertext:
                return _no("the secret changed meanwhile", "stale")
            self._use(current.key_id, -1)
            self._use(c.key_id, 1)
            current.key_id, current.ciphertext_hex = c.key_id, c.ciphertext_hex
            self._prune_keys()
            return _ok(c.name)
        if self._project(c.project) is None:
            return _no(f"no project {c.project}")
        if current is not None:
            self._use(current.key_id, -1)
        self._use(c.key_id, 1)
        self.secrets[(c.project, c.name)] = Secret(
            project=c.project,
            name=c.name,
            key_id=c.key_id,
            ciphertext_hex=c.ciphertext_hex,
            updated_at=c.at,
            updated_by=c.by,
        )
        self._prune_keys()
        self.audit(c.at, "secret set", c.by, project=c.project, target=c.name)
        return _ok(c.name)

    def _delete_secret(self, c: DeleteSecret) -> Outcome:
        gone = self.secrets.pop((c.project, c.name), None)
        if gone is None:
            return _no(f"no secret {c.name} in project {c.project}")
        self._use(gone.key_id, -1)
        self._prune_keys()
        self.audit(c.at, "secret rm", c.by, project=c.project, target=c.name)
        return _ok(c.name)

    def _audit_event(self, c: AuditEvent) -> Outcome:
        self.audit(c.at, c.action, c.by, c.project, c.target)
        return _ok(None)

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "users": [u.model_dump() for u in self.users.values()],
            "tokens": [t.model_dump() for t in self.tokens.values()],
            "projects": [p.model_dump() for p in self.projects.values()],
            "secrets": [s.model_dump() for s in self.secrets.values()],
            "data_keys": self.data_keys,
            "primary_key": self.primary_key,
            "audit": [a.model_dump() for a in self.audit_log],
        }

    def restore(self, doc: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self.users = {u["name"]: User.model_validate(u) for u in doc.get("users", [])}
        for t in doc.get("tokens", []):
            tok = UserToken.model_validate(t)
            self.tokens[tok.token_id] = tok
            self.by_verifier[tok.verifier] = tok
        self.projects = {p["name"]: Project.model_validate(p) for p in doc.get("projects", [])}
        for s in doc.get("secrets", []):
            sec = Secret.model_validate(s)
            self.secrets[(sec.project, sec.name)] = sec
            self._use(sec.key_id, 1)
        self.data_keys = dict(doc.get("data_keys", {}))
        self.primary_key = doc.get("primary_key", "")
        self.audit_log = [Audit.model_validate(a) for a in doc.get("audit", [])]


ACCESS_COMMANDS = (
    CreateUser,
    DeleteUser,
    IssueUserToken,
    RevokeUserToken,
    CreateProject,
    SetProjectQuota,
    DeleteProject,
    SetProjectMember,
    RemoveProjectMember,
    InstallDataKey,
    SetSecret,
    DeleteSecret,
    AuditEvent,
)
