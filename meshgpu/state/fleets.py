"""SSH fleets in the replicated state: each fleet's configuration, its private keys *sealed* (to
the cluster CA's public key: only holders of the CA key -- the voters -- can open them, and a
promoted voter gets the CA key, so a new leader can too), and the state of each of its hosts,
which the leader's fleet controller (``meshgpu/control/fleets.py``) moves along:

    provisioning --(joined)--> active
        |   ^                     |
        v   | (retry, backoff)    | (removed from the file / fleet delete)
       failed ------------------> terminating --(agent stopped, files removed, member out)--> gone

Per-host state lives here (not in the controller) so that a new leader continues where the old
one stopped: a host in ``provisioning`` is bootstrapped again (the bootstrap is idempotent: the
host keeps its data dir, so it joins as the same member), one in ``terminating`` is torn down.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from meshgpu.state.codec import Command

HostState = Literal["provisioning", "active", "failed", "terminating"]
FLEET_NAME = r"^[a-z0-9][a-z0-9-]{0,40}$"


class _Cmd(Command):
    domain: ClassVar[str] = "cluster"


class ApplyFleet(_Cmd):
    """Create or change a fleet: hosts new to it start provisioning, hosts no longer listed
    start terminating, the others keep their state."""

    kind: Literal["apply_fleet"] = "apply_fleet"
    name: str = Field(pattern=FLEET_NAME)
    spec: dict[str, Any]  # FleetConfiguration as JSON; identity files replaced by key ids
    keys: dict[str, str] = Field(default_factory=dict)  # key id -> sealed private key (hex)
    hostnames: list[str]
    # The fleet's ``env`` values (JSON of name -> value), sealed like the keys; ``spec`` keeps
    # only the names. Absent in entries written before it was sealed (their spec has the values).
    env_sealed: str = Field(default="", exclude_if=lambda v: not v)


class UpdateFleetHost(_Cmd):
    """The controller's progress on one host; a field left None is kept."""

    kind: Literal["update_fleet_host"] = "update_fleet_host"
    name: str
    hostname: str
    state: HostState | None = None
    reason: str | None = None
    attempts: int | None = None
    retry_at: float | None = None
    token_id: str | None = None
    node_id: str | None = None
    raft_id: int | None = None
    host_key: str | None = None
    # Applied only if the host is still in this state (a delete that raced the update wins).
    if_state: HostState | None = None


class ForgetFleetHost(_Cmd):
    """A terminated host is gone: its record goes (and the fleet's, once it is deleted and
    empty)."""

    kind: Literal["forget_fleet_host"] = "forget_fleet_host"
    name: str
    hostname: str


class DeleteFleet(_Cmd):
    """Take hosts out: every host (and then the fleet itself), or only ``hosts``."""

    kind: Literal["delete_fleet"] = "delete_fleet"
    name: str
    hosts: list[str] = Field(default_factory=list)


class FleetHost(BaseModel):
    hostname: str
    num: int  # the instance number, stable for the host's life in the fleet (label instance=N)
    state: HostState = "provisioning"
    reason: str = ""
    attempts: int = 0
    retry_at: float = 0.0
    token_id: str = ""  # the single-use join token of the current bootstrap
    node_id: str = ""  # once joined
    raft_id: int | None = None
    host_key: str = ""  # the SSH host key seen at the first connection (checked after)
    updated_at: float = 0.0


class Fleet(BaseModel):
    name: str
    spec: dict[str, Any]
    keys: dict[str, str] = Field(default_factory=dict)
    env_sealed: str = ""  # sealed JSON of the env values (ApplyFleet.env_sealed)
    hosts: dict[str, FleetHost] = Field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    deleting: bool = False
    next_num: int = 0


class Fleets:
    """The fleets part of ``ClusterState`` (deterministic; errors as (ok, value, error, code))."""

    def __init__(self) -> None:
        self.fleets: dict[str, Fleet] = {}

    def apply(self, c: ApplyFleet) -> tuple[bool, Any, str, str]:
        f = self.fleets.get(c.name)
        if f is None:
            f = self.fleets[c.name] = Fleet(name=c.name, spec=c.spec, created_at=c.at)
        f.spec, f.keys, f.updated_at, f.deleting = c.spec, dict(c.keys), c.at, False
        f.env_sealed = c.env_sealed
        wanted = list(dict.fromkeys(c.hostnames))
        for h in wanted:
            host = f.hosts.get(h)
            if host is None:
                f.hosts[h] = FleetHost(hostname=h, num=f.next_num, updated_at=c.at)
                f.next_num += 1
            elif host.state == "terminating":  # listed again before it was gone: bring it back
                host.state, host.reason, host.attempts, host.retry_at = "provisioning", "", 0, 0.0
                host.updated_at = c.at
        for h, host in f.hosts.items():
            if h not in wanted and host.state != "terminating":
                host.state, host.reason, host.updated_at = (
                    "terminating",
                    "removed from the fleet",
                    c.at,
                )
        return True, c.name, "", ""

    def update_host(self, c: UpdateFleetHost) -> tuple[bool, Any, str, str]:
        f = self.fleets.get(c.name)
        host = f.hosts.get(c.hostname) if f else None
        if host is None:
            return False, None, f"no host {c.hostname} in fleet {c.name}", "not_found"
        if c.if_state is not None and host.state != c.if_state:
            return False, None, f"host {c.hostname} is {host.state} now", "stale"
        for field in (
            "state",
            "reason",
            "attempts",
            "retry_at",
            "token_id",
            "node_id",
            "raft_id",
            "host_key",
        ):
            value = getattr(c, field)
            if value is not None:
                setattr(host, field, value)
        host.updated_at = c.at
        return True, c.hostname, "", ""

    def forget_host(self, c: ForgetFleetHost) -> tuple[bool, Any, str, str]:
        f = self.fleets.get(c.name)
        if f is None or f.hosts.pop(c.hostname, None) is None:
            return False, None, f"no host {c.hostname} in fleet {c.name}", "not_found"
        if f.deleting and not f.hosts:
            del self.fleets[c.name]
        return True, c.hostname, "", ""

    def delete(self, c: DeleteFleet) -> tuple[bool, Any, str, str]:
        f = self.fleets.get(c.name)
        if f is None:
            return False, None, f"no fleet {c.name}", "not_found"
        missing = [h for h in c.hosts if h not in f.hosts]
        if missing:
            return False, None, f"fleet {c.name} has no host {', '.join(missing)}", "not_found"
        for h in c.hosts or list(f.hosts):
            host = f.hosts[h]
            if host.state != "terminating":
                host.state, host.reason, host.updated_at = "terminating", "deleted", c.at
        if not c.hosts:
            f.deleting = True
            if not f.hosts:
                del self.fleets[c.name]
        return True, c.name, "", ""

    def by_node(self, node_id: str) -> tuple[Fleet, FleetHost] | None:
        for f in self.fleets.values():
            for h in f.hosts.values():
                if h.node_id == node_id:
                    return f, h
        return None

    def snapshot(self) -> list[dict[str, Any]]:
        return [f.model_dump() for f in self.fleets.values()]

    def restore(self, docs: list[dict[str, Any]]) -> None:
        self.fleets = {d["name"]: Fleet.model_validate(d) for d in docs}
