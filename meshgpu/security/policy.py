"""Who may do what: the one place it is decided. Pure functions over the replicated access
records (``meshgpu/state/access.py``); every API route, the log and metrics proxies, the SSH
tunnel and keys, and the ingress's ``auth: true`` ask here.

Roles are dstack's (reference/dstack-semantics.md §8):

- global ``admin``: everything, every project (the founding admin token is one);
- global ``user``: may create projects (becoming their admin), read the cluster (nodes, offers);
- project ``admin``: everything in the project (members of any role, quota, removal, secrets,
  its fleets: their hosts join the mesh, so applying and deleting one is an admin's);
- project ``manager``: members (not admins), secrets, and all a ``user`` may;
- project ``user``: runs (submit, stop, logs, metrics, attach), reading the project (its
  fleets too).

Visibility: what a caller may not even read in a project (it is no member) is *invisible*: the
API answers 404 as for a name that does not exist (``hidden``), so a non-member cannot learn
what another project runs. A member who may read but not do gets 403 (``denied``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# The replicated access records (``meshgpu.state.access.Access``; not imported: the state
# imports this module).
Access = Any

ADMIN = "admin"

Action = Literal[
    "project.read",  # see the project, its runs, logs, metrics, fleets, secret names
    "run.submit",
    "run.stop",
    "run.attach",
    "fleet.apply",  # create or change a fleet of the project
    "fleet.delete",  # remove a fleet of the project (or some of its hosts)
    "secret.read",  # a secret's value (get)
    "secret.manage",  # set, remove
    "member.manage",  # add/remove members (managers: not admins)
    "member.manage_admin",
    "project.manage",  # quota, removal
    "audit.read",
]

_PROJECT_ROLE_ACTIONS: dict[str, frozenset[str]] = {
    "user": frozenset({"project.read", "run.submit", "run.stop", "run.attach"}),
    "manager": frozenset(
        {
            "project.read",
            "run.submit",
            "run.stop",
            "run.attach",
            "secret.read",
            "secret.manage",
            "member.manage",
            "audit.read",
        }
    ),
}
_PROJECT_ROLE_ACTIONS["admin"] = _PROJECT_ROLE_ACTIONS["manager"] | {
    "member.manage_admin",
    "project.manage",
    "fleet.apply",
    "fleet.delete",
}

GlobalAction = Literal[
    "cluster.read",  # nodes, status, offers, own user
    "cluster.manage",  # join tokens, nodes removal, cluster-wide settings
    "user.manage",  # create/remove users, their tokens
    "project.create",
    "audit.read_all",
]
_GLOBAL_USER = frozenset({"cluster.read", "project.create"})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is: a user and its global role (from its token)."""

    user: str
    global_role: str = "user"

    @property
    def is_admin(self) -> bool:
        return self.global_role == ADMIN


FOUNDING_ADMIN = Principal(ADMIN, ADMIN)


def principal_of(access: Access, user: str) -> Principal | None:
    """The principal of a user name (None: no such user)."""
    if user == ADMIN:
        return FOUNDING_ADMIN
    u = access.users.get(user)
    return None if u is None else Principal(u.name, u.global_role)


def role(access: Access, who: Principal, project: str) -> str | None:
    """The caller's role in ``project`` (a global admin is every project's admin); None: not
    a member (or no such project)."""
    if not access.project_exists(project):
        return None
    if who.is_admin:
        return "admin"
    return access.role_in(who.user, project)


def visible(access: Access, who: Principal, project: str) -> bool:
    """Whether the caller may know ``project`` and what is in it at all."""
    return role(access, who, project) is not None


def allowed(access: Access, who: Principal, action: str, project: str) -> bool:
    r = role(access, who, project)
    return r is not None and action in _PROJECT_ROLE_ACTIONS[r]


def allowed_global(who: Principal, action: str) -> bool:
    return who.is_admin or action in _GLOBAL_USER


def may_grant(
    access: Access, who: Principal, project: str, role_name: str, current: str | None
) -> bool:
    """May the caller make someone ``role_name`` in ``project`` (or take away ``current``)?
    Managers manage users and managers; only admins make or unmake admins."""
    if role_name == "admin" or current == "admin":
        return allowed(access, who, "member.manage_admin", project)
    return allowed(access, who, "member.manage", project)


def visible_projects(access: Access, who: Principal) -> list[str]:
    names = sorted({"main", *access.projects})
    return [p for p in names if visible(access, who, p)]
