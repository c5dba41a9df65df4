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

from meshgpu.state.access import DEFAULT_PROJECT
from meshgpu.state.codec import Command

HostState = Literal["provisioning", "active", "failed", "terminating"]
# A backend fleet's instance (dstack's instance status machine, section 4.3 of the reference):
# recorded ``pending`` *before* the cloud is asked (so a leader that dies during the call leaves
# a record the next one reconciles by tag: no orphan, no duplicate), ``provisioning`` once the
# cloud accepted it, ``idle``/``busy`` once its agent joined, ``terminating`` until the cloud
# confirms, then forgotten.
InstanceState = Literal["pending", "provisioning", "idle", "busy", "terminating"]
BACKEND_NAME = r"^[a-z0-9][a-z0-9-]{0,40}$"
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
    # The project the fleet belongs to (who may see and change it); entries written before
    # fleets had one are main's.
    project: str = Field(default=DEFAULT_PROJECT, exclude_if=lambda v: v == DEFAULT_PROJECT)


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


class AddBackend(_Cmd):
    """Configure a backend (a plugin of the ``meshgpu.backends`` entry-point group) under a
    name; its credentials sealed to the CA (as fleet keys are)."""

    kind: Literal["add_backend"] = "add_backend"
    name: str = Field(pattern=BACKEND_NAME)
    type: str
    config: dict[str, Any] = Field(default_factory=dict)  # non-secret settings
    sealed: str = ""  # sealed JSON of the secret settings (hex)


class RemoveBackend(_Cmd):
    kind: Literal["remove_backend"] = "remove_backend"
    name: str


class AddFleetInstance(_Cmd):
    """A backend fleet's new instance, recorded before the cloud call (state ``pending``)."""

    kind: Literal["add_fleet_instance"] = "add_fleet_instance"
    name: str  # the fleet
    instance_id: str
    backend: str
    offer: dict[str, Any]
    reason: str = ""  # why it was created ("for run X", "nodes.min")
    for_job: str = ""  # the waiting job it is bought for ("" for nodes.min)
    candidates: list[dict[str, Any]] = Field(default_factory=list)  # offers to fall back on
    max_instances: int | None = None  # refused when the fleet already has this many
    # bought for nodes.target (counts down Fleet.target_left)
    for_target: bool = Field(default=False, exclude_if=lambda v: not v)


class UpdateFleetInstance(_Cmd):
    kind: Literal["update_fleet_instance"] = "update_fleet_instance"
    name: str
    instance_id: str
    state: InstanceState | None = None
    reason: str | None = None
    ref: dict[str, Any] | None = None  # the cloud's handle (InstanceRef)
    offer: dict[str, Any] | None = None
    backend: str | None = None
    token_id: str | None = None
    node_id: str | None = None
    idle_since: float | None = None
    attempts: int | None = None
    retry_at: float | None = None
    if_state: InstanceState | None = None
    # sha256 of the secret the instance's user data downloads the agent file with
    download_hash: str | None = Field(default=None, exclude_if=lambda v: v is None)


class ForgetFleetInstance(_Cmd):
    kind: Literal["forget_fleet_instance"] = "forget_fleet_instance"
    name: str
    instance_id: str


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


TARGET_REASON = "nodes.target"  # AddFleetInstance.reason of an instance bought for nodes.target


def _target(spec: dict[str, Any]) -> int | None:
    n = spec.get("nodes") or {}
    return None if n.get("target") is None else int(n["target"])


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


class FleetInstance(BaseModel):
    instance_id: str  # also the cloud tag meshgpu-instance
    num: int
    backend: str
    offer: dict[str, Any]  # the Offer taken (type, region, price, spot, gpus ...)
    for_job: str = ""
    for_target: bool = Field(default=False, exclude_if=lambda v: not v)  # AddFleetInstance's
    candidates: list[dict[str, Any]] = Field(default_factory=list)
    state: InstanceState = "pending"
    reason: str = ""
    ref: dict[str, Any] = Field(default_factory=dict)
    token_id: str = ""
    node_id: str = ""
    idle_since: float = 0.0
    attempts: int = 0
    retry_at: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
    # sha256 (hex) of the secret in its user data that downloads the agent file from a member
    # (``GET /api/v1/agent/meshgpu.pyz``) while it is pending or provisioning
    download_hash: str = Field(default="", exclude_if=lambda v: not v)


class BackendConfig(BaseModel):
    name: str
    type: str
    config: dict[str, Any] = Field(default_factory=dict)
    sealed: str = ""
    created_at: float = 0.0


class Fleet(BaseModel):
    name: str
    spec: dict[str, Any]
    keys: dict[str, str] = Field(default_factory=dict)
    env_sealed: str = ""  # sealed JSON of the env values (ApplyFleet.env_sealed)
    project: str = Field(default=DEFAULT_PROJECT, exclude_if=lambda v: v == DEFAULT_PROJECT)
    hosts: dict[str, FleetHost] = Field(default_factory=dict)
    instances: dict[str, FleetInstance] = Field(default_factory=dict, exclude_if=lambda v: not v)
    created_at: float = 0.0
    updated_at: float = 0.0
    deleting: bool = False
    next_num: int = 0
    # A backend fleet's ``nodes.target``: instances still to buy to reach it (set when the fleet
    # is applied with a new target; each instance added for it counts down, one that never got
    # created counts back up). Only the first provisioning: idle ones then go down to nodes.min.
    target_left: int = Field(default=0, exclude_if=lambda v: not v)


class Fleets:
    """The fleets part of ``ClusterState`` (deterministic; errors as (ok, value, error, code))."""

    def __init__(self) -> None:
        self.fleets: dict[str, Fleet] = {}
        self.backends: dict[str, BackendConfig] = {}

    def is_backend_fleet(self, f: Fleet) -> bool:
        return not f.spec.get("ssh_config")

    # -- backends ------------------------------------------------------------------------------

    def add_backend(self, c: AddBackend) -> tuple[bool, Any, str, str]:
        self.backends[c.name] = BackendConfig(
            name=c.name, type=c.type, config=dict(c.config), sealed=c.sealed, created_at=c.at
        )
        return True, c.name, "", ""

    def remove_backend(self, c: RemoveBackend) -> tuple[bool, Any, str, str]:
        if c.name not in self.backends:
            return False, None, f"no backend {c.name}", "not_found"
        users = sorted(
            f.name
            for f in self.fleets.values()
            if any(i.backend == c.name for i in f.instances.values())
        )
        if users:
            return (
                False,
                None,
                f"backend {c.name} still has instances in fleet {', '.join(users)}: delete "
                "the fleet (or wait for its instances to go) first",
                "in_use",
            )
        del self.backends[c.name]
        return True, c.name, "", ""

    # -- backend fleets' instances -------------------------------------------------------------

    def add_instance(self, c: AddFleetInstance) -> tuple[bool, Any, str, str]:
        f = self.fleets.get(c.name)
        if f is None or f.deleting:
            return False, None, f"no fleet {c.name}", "not_found"
        if c.instance_id in f.instances:
            return False, None, f"instance {c.instance_id} exists", "exists"
        if c.max_instances is not None and len(f.instances) >= c.max_instances:
            return False, None, f"fleet {c.name} has nodes.max instances", "full"
        if c.for_target:
            if f.target_left <= 0:
                return False, None, f"fleet {c.name} has reached nodes.target", "full"
            f.target_left -= 1
        f.instances[c.instance_id] = FleetInstance(
            instance_id=c.instance_id,
            num=f.next_num,
            backend=c.backend,
            offer=dict(c.offer),
            reason=c.reason,
            for_job=c.for_job,
            for_target=c.for_target,
            candidates=list(c.candidates),
            created_at=c.at,
            updated_at=c.at,
        )
        f.next_num += 1
        return True, c.instance_id, "", ""

    def update_instance(self, c: UpdateFleetInstance) -> tuple[bool, Any, str, str]:
        f = self.fleets.get(c.name)
        inst = f.instances.get(c.instance_id) if f else None
        if inst is None:
            return False, None, f"no instance {c.instance_id} in fleet {c.name}", "not_found"
        if c.if_state is not None and inst.state != c.if_state:
            return False, None, f"instance {c.instance_id} is {inst.state} now", "stale"
        if inst.state == "terminating" and c.state not in (None, "terminating"):
            return False, None, f"instance {c.instance_id} is terminating", "stale"
        for field in (
            "state",
            "reason",
            "ref",
            "offer",
            "backend",
            "token_id",
            "node_id",
            "idle_since",
            "attempts",
            "retry_at",
            "download_hash",
        ):
            value = getattr(c, field)
            if value is not None:
                setattr(inst, field, value)
        inst.updated_at = c.at
        return True, c.instance_id, "", ""

    def forget_instance(self, c: ForgetFleetInstance) -> tuple[bool, Any, str, str]:
        f = self.fleets.get(c.name)
        inst = f.instances.pop(c.instance_id, None) if f is not None else None
        if f is None or inst is None:
            return False, None, f"no instance {c.instance_id} in fleet {c.name}", "not_found"
        if inst.for_target and inst.state == "pending" and not f.deleting:
            f.target_left += 1  # never created (no offer had capacity): still to buy
        if f.deleting and not f.hosts and not f.instances:
            del self.fleets[c.name]
        return True, c.instance_id, "", ""

    def apply(self, c: ApplyFleet) -> tuple[bool, Any, str, str]:
        f = self.fleets.get(c.name)
        if f is not None and f.project != c.project:
            # fleet names are the mesh's: one project cannot take over (nor revive) another's
            return False, None, f"fleet {c.name} belongs to another project", "exists"
        old_target = _target(f.spec) if f is not None and not f.deleting else None
        if f is None:
            f = self.fleets[c.name] = Fleet(
                name=c.name, spec=c.spec, created_at=c.at, project=c.project
            )
        new_target = _target(c.spec)
        if not c.spec.get("ssh_config") and new_target != old_target:
            alive = sum(1 for i in f.instances.values() if i.state != "terminating")
            f.target_left = max(0, (new_target or 0) - alive)
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
        if f.deleting and not f.hosts and not f.instances:
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
            for inst in f.instances.values():
                if inst.state != "terminating":
                    inst.state, inst.reason, inst.updated_at = "terminating", "deleted", c.at
            f.deleting = True
            if not f.hosts and not f.instances:
                del self.fleets[c.name]
        return True, c.name, "", ""

    def by_node(self, node_id: str) -> tuple[Fleet, FleetHost] | None:
        for f in self.fleets.values():
            for h in f.hosts.values():
                if h.node_id == node_id:
                    return f, h
        return None

    def instance_by_node(self, node_id: str) -> tuple[Fleet, FleetInstance] | None:
        for f in self.fleets.values():
            for i in f.instances.values():
                if i.node_id == node_id:
                    return f, i
        return None

    def snapshot(self) -> list[dict[str, Any]]:
        return [f.model_dump() for f in self.fleets.values()]

    def restore(self, docs: list[dict[str, Any]]) -> None:
        self.fleets = {d["name"]: Fleet.model_validate(d) for d in docs}

    def snapshot_backends(self) -> list[dict[str, Any]]:
        return [b.model_dump() for b in self.backends.values()]

    def restore_backends(self, docs: list[dict[str, Any]]) -> None:
        self.backends = {d["name"]: BackendConfig.model_validate(d) for d in docs}
