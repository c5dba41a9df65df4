"""SSH fleets as use cases: apply (record the fleet, its keys sealed), list, get, delete. The
hosts are brought in and out by the leader's fleet controller (``meshgpu/control/fleets.py``)."""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

from meshgpu.config import ConfigError
from meshgpu.config.infra import FleetConfiguration
from meshgpu.config.support import MeshCapabilities
from meshgpu.errors import Conflict, Denied, Invalid, NotFound
from meshgpu.ops.configs import _invalid_config, parse_config_async
from meshgpu.security import policy, seal
from meshgpu.security.policy import Principal
from meshgpu.state.access import DEFAULT_PROJECT
from meshgpu.state.cluster import encode_cluster
from meshgpu.state.fleets import ApplyFleet, DeleteFleet

if TYPE_CHECKING:
    from meshgpu.replica.proposer import Proposer
    from meshgpu.state import StateMachine
    from meshgpu.state.cluster import ClusterState
    from meshgpu.state.fleets import Fleet

MAX_KEY_BYTES = 64 << 10


def identity_refs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every mapping of an SSH fleet spec that may carry an ``identity_file``."""
    cfg = spec.get("ssh_config") or {}
    out = [cfg]
    if cfg.get("proxy_jump"):
        out.append(cfg["proxy_jump"])
    for h in cfg.get("hosts", []):
        out.append(h)
        if h.get("proxy_jump"):
            out.append(h["proxy_jump"])
    return out


def key_id(text: str) -> str:
    return "key-" + hashlib.sha256(text.encode()).hexdigest()[:16]


class Fleets:
    def __init__(self, proposer: Proposer, cluster: ClusterState, state: StateMachine) -> None:
        self.proposer, self.cluster, self.state = proposer, cluster, state

    # -- who can see what (``meshgpu/security/policy.py``; ``who`` None: the node itself) -----

    def _visible(self, who: Principal | None, f: Fleet) -> bool:
        return who is None or policy.visible(self.cluster.access, who, f.project)

    def _require(self, who: Principal | None, action: str, project: str) -> None:
        """``NotFound`` unless the caller may see ``project``, ``Denied`` unless it may do
        ``action`` there."""
        if who is None:
            return
        access = self.cluster.access
        if not policy.visible(access, who, project):
            raise NotFound(
                "project not found",
                f"no project {project!r} of yours; see meshgpu project ls",
                "not_found",
            )
        if not policy.allowed(access, who, action, project):
            raise Denied(
                "not allowed",
                f"{who.user} is a {policy.role(access, who, project)} of project {project}: "
                f"only a project admin may {action.split('.')[1]} its fleets",
                "forbidden",
            )

    def _fleet(self, who: Principal | None, name: str) -> Fleet:
        """The fleet, if the caller may see its project (else the same ``NotFound`` as for no
        such fleet)."""
        f = self.cluster.fleets.fleets.get(name)
        if f is None or not self._visible(who, f):
            raise NotFound("fleet not found", f"no fleet {name}", "not_found")
        return f

    def _name_free(self, who: Principal | None, name: str, project: str) -> None:
        other = self.cluster.fleets.fleets.get(name)
        if other is not None and other.project != project:
            where = other.project if self._visible(who, other) else "another project"
            raise Conflict(
                "fleet name taken",
                f"a fleet named {name} belongs to {where} (fleet names are the mesh's): "
                "pick another name",
                "exists",
            )

    async def apply(
        self,
        text: str,
        filename: str,
        identities: dict[str, str],
        who: Principal | None = None,
        project: str = DEFAULT_PROJECT,
    ) -> dict[str, Any]:
        """Create or change a fleet of ``project`` (the caller: its admin, or a global one)."""
        self._require(who, "fleet.apply", project)
        try:
            # what a fleet may ask does not depend on the members (support.py's fleet tables),
            # only placement: cluster on the backends; a refused field is an issue at its line
            # like a parse error
            config = await parse_config_async(text, filename, caps=self._caps())
        except ConfigError as e:
            raise _invalid_config(e) from None
        if not isinstance(config, FleetConfiguration):
            raise Invalid(
                f"{config.type} configurations are not fleets",
                "apply runs with meshgpu apply (the CLI sends them to the runs API)",
                "not_a_fleet",
            )
        if not config.name:
            raise Invalid("the fleet needs a name", "add name: my-fleet to the file", "no_name")
        self._name_free(who, config.name, project)
        if config.ssh_config is None:
            return await self._apply_backend_fleet(config, project)
        spec = config.model_dump(mode="json", exclude_none=True)
        keys: dict[str, str] = {}
        ca = self.cluster.ca_cert_pem.encode()
        for part in identity_refs(spec):
            path = part.get("identity_file")
            if not path:
                continue
            key = identities.get(path)
            if key is None:
                raise Invalid(
                    "missing private key",
                    f"identity_file {path}: the request carries no key for it (meshgpu apply "
                    "reads the file and sends it)",
                    "missing_key",
                )
            if len(key) > MAX_KEY_BYTES or not _is_private_key(key):
                raise Invalid(
                    "not a private key",
                    f"identity_file {path} is not an unencrypted SSH private key",
                    "bad_key",
                )
            kid = key_id(key)
            # Sealed to the CA's public key: only the voters (holders of the CA key) open it.
            keys.setdefault(kid, seal(key.encode(), ca).hex())
            part["identity_file"] = kid
        # The env values are sealed like the keys (they often hold tokens); the spec keeps the
        # names (null values, as in a file's bare ``- NAME``).
        env = {str(k): str(v) for k, v in (spec.get("env") or {}).items() if v is not None}
        env_sealed = seal(json.dumps(env).encode(), ca).hex() if env else ""
        if spec.get("env"):
            spec["env"] = dict.fromkeys(spec["env"])
        hostnames = [h.hostname for h in config.ssh_config.hosts]
        for other in self.cluster.fleets.fleets.values():
            if other.name == config.name:
                continue
            taken = sorted(set(hostnames) & set(other.hosts))
            if taken and not self._visible(who, other):
                raise Conflict(
                    "host in another fleet",
                    f"{', '.join(taken)} already belongs to a fleet of another project: its "
                    "admin must delete it there first",
                    "host_in_use",
                )
            if taken:
                raise Conflict(
                    "host in another fleet",
                    f"{', '.join(taken)} already belongs to fleet {other.name}: delete it there "
                    f"first (meshgpu fleet delete {other.name} --host {taken[0]})",
                    "host_in_use",
                )
        cmd = ApplyFleet(
            at=time.time(),
            name=config.name,
            spec=spec,
            keys=keys,
            hostnames=hostnames,
            env_sealed=env_sealed,
            project=project,
        )
        result = await self.proposer.propose(encode_cluster(cmd))
        if not result.ok:
            raise Invalid("fleet not applied", result.error, result.code or "invalid")
        return self.get(config.name)

    def _caps(self) -> MeshCapabilities:
        from meshgpu.fleets.backends import supports_cluster

        return MeshCapabilities(
            backends=tuple(
                (name, cfg.type, supports_cluster(cfg.type))
                for name, cfg in sorted(self.cluster.fleets.backends.items())
            )
        )

    async def _apply_backend_fleet(
        self, config: FleetConfiguration, project: str = DEFAULT_PROJECT
    ) -> dict[str, Any]:
        """A backend (cloud) fleet: its instances are bought by the leader's controller."""
        backends = self.cluster.fleets.backends
        if not backends:
            raise Invalid(
                "no backend configured",
                "a fleet without ssh_config provisions from backends: add one first "
                "(meshgpu backend add local, or meshgpu backend add aws ...)",
                "no_backend",
            )
        if config.nodes is None:
            raise Invalid(
                "a backend fleet needs nodes",
                "give nodes: N or a range (nodes: 0..2 buys instances only for waiting runs)",
                "no_nodes",
            )
        if config.backends:
            known = set(backends) | {b.type for b in backends.values()}
            unknown = [b for b in config.backends if b not in known]
            if unknown:
                raise Invalid(
                    "unknown backend",
                    f"backends: {', '.join(unknown)} is not configured (meshgpu backend ls "
                    f"shows {', '.join(sorted(backends))})",
                    "unknown_backend",
                )
        other = self.cluster.fleets.fleets.get(config.name)  # type: ignore[arg-type]
        if other is not None and other.hosts:
            raise Conflict(
                "an SSH fleet has this name",
                f"fleet {config.name} is an SSH fleet: delete it first or pick another name",
                "fleet_kind",
            )
        spec = config.model_dump(mode="json", exclude_none=True)
        cmd = ApplyFleet(
            at=time.time(),
            name=config.name,  # type: ignore[arg-type]
            spec=spec,
            hostnames=[],
            project=project,
        )
        result = await self.proposer.propose(encode_cluster(cmd))
        if not result.ok:
            raise Invalid("fleet not applied", result.error, result.code or "invalid")
        return self.get(config.name)  # type: ignore[arg-type]

    def list(self, who: Principal | None = None) -> list[dict[str, Any]]:
        """The fleets of the projects the caller may see (a global admin: all)."""
        return [
            self.view(f)
            for f in sorted(self.cluster.fleets.fleets.values(), key=lambda f: f.name)
            if self._visible(who, f)
        ]

    def get(self, name: str, who: Principal | None = None) -> dict[str, Any]:
        return self.view(self._fleet(who, name))

    async def delete(
        self, name: str, hosts: list[str], who: Principal | None = None
    ) -> dict[str, Any]:
        f = self._fleet(who, name)
        self._require(who, "fleet.delete", f.project)
        cmd = DeleteFleet(at=time.time(), name=name, hosts=hosts)
        result = await self.proposer.propose(encode_cluster(cmd))
        if not result.ok:
            raise NotFound("fleet not found", result.error, result.code or "not_found")
        f = self.cluster.fleets.fleets.get(name)
        return self.view(f) if f is not None else {"name": name, "deleted": True, "hosts": []}

    def view(self, f: Fleet) -> dict[str, Any]:
        """What a user sees of a fleet: never its keys."""
        cfg = f.spec.get("ssh_config") or {}
        hosts = []
        for h in sorted(f.hosts.values(), key=lambda h: h.num):
            node = self.state.nodes.get(h.node_id) if h.node_id else None
            hosts.append(
                {
                    "hostname": h.hostname,
                    "instance": h.num,
                    "state": h.state,
                    "reason": h.reason,
                    "attempts": h.attempts,
                    "retry_at": h.retry_at or None,
                    "node_id": h.node_id or None,
                    "node": node.name if node is not None else None,
                    "updated_at": h.updated_at,
                }
            )
        instances = []
        for i in sorted(f.instances.values(), key=lambda i: i.num):
            node = self.state.nodes.get(i.node_id) if i.node_id else None
            o = i.offer
            instances.append(
                {
                    "instance_id": i.instance_id,
                    "instance": i.num,
                    "name": f"{f.name}-{i.num}",
                    "backend": i.backend,
                    "region": o.get("region", ""),
                    "instance_type": o.get("instance_type", ""),
                    "spot": bool(o.get("spot")),
                    "price": o.get("price"),
                    "gpus": _gpus_text(o),
                    "state": i.state,
                    "reason": i.reason,
                    "cloud_id": i.ref.get("instance_id") if i.ref else None,
                    "address": i.ref.get("address") if i.ref else None,
                    "for_job": i.for_job or None,
                    "node_id": i.node_id or None,
                    "node": node.name if node is not None else None,
                    "created_at": i.created_at,
                    "updated_at": i.updated_at,
                }
            )
        nodes = f.spec.get("nodes") or {}
        return {
            "name": f.name,
            "project": f.project,
            "kind": "ssh" if f.spec.get("ssh_config") else "backend",
            "nodes": {"min": nodes.get("min", 0), "max": nodes.get("max")} if nodes else None,
            "instances": instances,
            "placement": f.spec.get("placement") or "any",
            "user": cfg.get("user"),
            "deleting": f.deleting,
            "created_at": f.created_at,
            "updated_at": f.updated_at,
            "hosts": hosts,
        }


def _gpus_text(o: dict[str, Any]) -> str:
    n = o.get("gpu_count") or 0
    if not n:
        return "-"
    mem = f":{o['gpu_memory_gb']:g}GB" if o.get("gpu_memory_gb") else ""
    return f"{n}x{o.get('gpu_name', '')}{mem}"


def _is_private_key(text: str) -> bool:
    import asyncssh

    try:
        asyncssh.import_private_key(text)
    except (asyncssh.KeyImportError, ValueError):
        return False
    return True
