"""Backends as use cases: add (the plugin is loaded and its credentials checked *before* they
are stored, sealed to the voters), list, remove, and the offers of every backend beside the
mesh's own capacity (``meshgpu offer``)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from meshgpu.errors import Conflict, Denied, Invalid, NotFound, Unavailable
from meshgpu.security import seal
from meshgpu.state.cluster import encode_cluster
from meshgpu.state.fleets import BACKEND_NAME, AddBackend, RemoveBackend

if TYPE_CHECKING:
    from meshgpu.replica.proposer import Proposer
    from meshgpu.state.cluster import ClusterState

CHECK_TIMEOUT_S = 30.0
MAX_SETTINGS = 32


# Instances a download secret is good for: not yet joined (``pending`` before the cloud call
# returned, ``provisioning`` after), at most this long after the record last changed.
DOWNLOAD_STATES = ("pending", "provisioning")
DOWNLOAD_TTL_S = 1800.0
MAX_DOWNLOAD_SECRET = 256
MAX_AGENT_FILE = 1 << 30  # what a member serves at most (the file is ~30 MB)
OFFERS_TIMEOUT_S = 20.0  # one backend's offers
MAX_OFFERS = 50  # the cheapest, over all backends


def download_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Backends:
    def __init__(
        self,
        proposer: Proposer,
        cluster: ClusterState,
        agent_file: Callable[[], Path] | None = None,
        *,
        node: Any = None,  # the Raft node (role, leader): offers are answered by the leader
        peers: Any = None,  # Peers: a follower forwards an offers question to the leader
        ca_key_path: Path | None = None,  # a voter's CA key: opens the sealed credentials
        loader: Callable[..., Any] | None = None,
    ) -> None:
        self.proposer, self.cluster = proposer, cluster
        self.agent_file = agent_file  # () -> this node's agent file (blocking: may build it)
        self.downloads = trio.CapacityLimiter(4)  # files streamed at once by this node
        self.node, self.peers, self.ca_key_path, self.loader = node, peers, ca_key_path, loader

    # -- offers (``meshgpu offer``) ------------------------------------------------------------

    async def offers(self, req: dict[str, Any], only: list[str] | None = None) -> dict[str, Any]:
        """What the backends would sell for ``req`` (``fleets.backends.Requirements`` as a
        mapping), cheapest first, and the backends that failed. Only a voter can open the
        credentials, so the leader answers; a follower forwards the question there."""
        if not self.cluster.fleets.backends:
            return {"offers": [], "failed": []}
        from consensus.core import Role

        node = self.node
        if node is None:
            raise Unavailable("no backends here", "this node answers no offers", "unavailable")
        if not node.leader:
            raise Unavailable("no leader right now", "retry in a few seconds", "unavailable")
        if node.role is not Role.LEADER:
            leader = self.cluster.members.get(node.leader)
            if leader is None or self.peers is None:
                raise Unavailable("leader unknown", "retry in a few seconds", "unavailable")
            return await self.peers.backend_offers(
                leader.node_id, {"req": req, "only": only}, timeout=OFFERS_TIMEOUT_S + 5
            )
        return await self.offers_here(req, only)

    async def offers_forwarded(self, body: dict[str, Any]) -> dict[str, Any]:
        """An offers question a follower forwarded over the peer port: the leader's answer (a
        member that lost the leadership says so rather than forwarding again)."""
        from consensus.core import Role

        if self.node is None or self.node.role is not Role.LEADER:
            raise Unavailable("not the leader", "retry in a few seconds", "not_leader")
        only = body.get("only")
        if only is not None and not (
            isinstance(only, list) and all(isinstance(x, str) for x in only)
        ):
            raise Invalid("bad offers question", "only is a list of backend names", "invalid")
        return await self.offers_here(body.get("req") or {}, only)

    async def offers_here(self, req: dict[str, Any], only: list[str] | None) -> dict[str, Any]:
        from meshgpu.fleets.backends import BackendError, Requirements, filter_offers, load

        try:
            r = Requirements(
                **{
                    k: tuple(v) if isinstance(v, list) else v
                    for k, v in req.items()
                    if k in Requirements.__dataclass_fields__
                }
            )
        except TypeError as e:
            raise Invalid("bad offers question", str(e), "invalid") from None
        loader = self.loader or load
        found: list[Any] = []
        failed: list[str] = []
        for name, cfg in sorted(self.cluster.fleets.backends.items()):
            if only and name not in only and cfg.type not in only:
                continue
            try:
                secrets = self._secrets(name, cfg.sealed)

                def ask(cfg: Any = cfg, secrets: dict[str, Any] = secrets) -> list[Any]:
                    return list(loader(cfg.type, cfg.name, cfg.config, secrets).offers(r))

                with trio.fail_after(OFFERS_TIMEOUT_S):
                    found += await trio.to_thread.run_sync(ask, abandon_on_cancel=True)
            except BackendError as e:
                failed.append(f"{name}: {e}")
            except trio.TooSlowError:
                failed.append(f"{name}: no answer within {OFFERS_TIMEOUT_S:g} s")
        offers = filter_offers(found, r)[:MAX_OFFERS]
        return {"offers": [o.to_dict() for o in offers], "failed": failed}

    def _secrets(self, name: str, sealed: str) -> dict[str, Any]:
        from meshgpu.fleets.backends import BackendError

        if not sealed:
            return {}
        from cryptography.hazmat.primitives import serialization

        from meshgpu.security import unseal

        if self.ca_key_path is None:
            raise BackendError("this member holds no CA key (not a voter)")
        try:
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
            return dict(json.loads(unseal(bytes.fromhex(sealed), key)))  # type: ignore[arg-type]
        except (OSError, ValueError) as e:
            raise BackendError(f"cannot open backend {name}'s secrets here: {e}") from None

    def download_allowed(self, secret: str, now: float | None = None) -> str:
        """The instance id a download secret (the ``X-Meshgpu-Download`` header of an
        instance's user data) is good for, or ``Denied``: a secret is single-instance,
        and good only until the instance joins (or ``DOWNLOAD_TTL_S`` after its record last
        changed). The join token is not touched: the download neither shows nor consumes it."""
        now = time.time() if now is None else now
        if not secret or len(secret) > MAX_DOWNLOAD_SECRET:
            raise Denied(
                "no download secret", "this file is for the mesh's new instances", "forbidden"
            )
        want = download_hash(secret)
        found = ""
        for f in self.cluster.fleets.fleets.values():
            for i in f.instances.values():
                if (
                    i.download_hash
                    and hmac.compare_digest(i.download_hash, want)
                    and i.state in DOWNLOAD_STATES
                    and now - i.updated_at <= DOWNLOAD_TTL_S
                ):
                    found = i.instance_id
        if not found:
            raise Denied(
                "download refused",
                "the secret is unknown, or its instance has joined or expired",
                "forbidden",
            )
        return found

    async def agent_path(self) -> Path:
        """This node's agent file (built once from its installation if it runs from none)."""
        if self.agent_file is None:
            raise Unavailable("no agent file", "this node serves no agent file", "unavailable")
        from meshgpu.fleets.pyz import BuildError

        try:
            path = await trio.to_thread.run_sync(self.agent_file)
        except BuildError as e:
            raise Unavailable("no agent file", str(e), "unavailable") from None
        return path

    async def add(
        self, name: str, type_: str, config: dict[str, str], secrets: dict[str, str]
    ) -> dict[str, Any]:
        import re

        from meshgpu.fleets.backends import BackendError, CredentialsError, load, types

        if not re.match(BACKEND_NAME, name):
            raise Invalid(
                "bad backend name",
                f"{name!r}: use lowercase letters, digits and dashes (at most 41)",
                "bad_name",
            )
        if len(config) + len(secrets) > MAX_SETTINGS:
            raise Invalid("too many settings", f"at most {MAX_SETTINGS}", "too_many")
        if type_ not in types():
            raise Invalid(
                "unknown backend type",
                f"{type_!r} is not installed here (installed: {', '.join(sorted(types()))}): "
                "install its plugin package on every voter",
                "unknown_type",
            )

        def check() -> None:
            load(type_, name, config, secrets).check()

        try:
            with trio.fail_after(CHECK_TIMEOUT_S):
                await trio.to_thread.run_sync(check, abandon_on_cancel=True)
        except CredentialsError as e:
            raise Invalid("backend refused the credentials", str(e), "bad_credentials") from None
        except BackendError as e:
            raise Invalid("backend not usable", str(e), "backend_error") from None
        except trio.TooSlowError:
            raise Invalid(
                "backend did not answer",
                f"{type_} did not answer within {CHECK_TIMEOUT_S:g} s: check its endpoint "
                "and this host's network",
                "backend_timeout",
            ) from None
        sealed = ""
        if secrets:
            blob = json.dumps(secrets, sort_keys=True).encode()
            sealed = seal(blob, self.cluster.ca_cert_pem.encode()).hex()
        cmd = AddBackend(at=time.time(), name=name, type=type_, config=config, sealed=sealed)
        result = await self.proposer.propose(encode_cluster(cmd))
        if not result.ok:
            raise Invalid("backend not added", result.error, result.code or "invalid")
        return self.get(name)

    def list(self) -> list[dict[str, Any]]:
        return [self.get(n) for n in sorted(self.cluster.fleets.backends)]

    def get(self, name: str) -> dict[str, Any]:
        b = self.cluster.fleets.backends.get(name)
        if b is None:
            raise NotFound("backend not found", f"no backend {name}", "not_found")
        used = sum(
            1
            for f in self.cluster.fleets.fleets.values()
            for i in f.instances.values()
            if i.backend == name
        )
        return {
            "name": b.name,
            "type": b.type,
            "config": b.config,
            "secrets": "sealed" if b.sealed else "none",
            "instances": used,
            "created_at": b.created_at,
        }

    async def remove(self, name: str) -> dict[str, Any]:
        result = await self.proposer.propose(
            encode_cluster(RemoveBackend(at=time.time(), name=name))
        )
        if not result.ok:
            if result.code == "in_use":
                raise Conflict("backend in use", result.error, "in_use")
            raise NotFound("backend not found", result.error, result.code or "not_found")
        return {"name": name, "removed": True}
