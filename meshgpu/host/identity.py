"""Who this host is in the mesh: ``node.json`` (node id, Raft id, cluster id, the members last
known), the node certificate (``tls/``), the admin token, and the addresses peers and clients
reach it at. ``establish`` restarts as ourselves, joins with a token, or founds a new mesh."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import uuid
from typing import TYPE_CHECKING, Any

import httpx
import trio

from consensus.transport import parse_address
from meshgpu.datadir import open_private, private_dir, secure_data_dir, write_private
from meshgpu.mesh.address import choose_address, host_port, is_unspecified
from meshgpu.mesh.discovery import browse
from meshgpu.mesh.join import (
    JoinError,
    normalize_member_url,
    request_join,
    resolve_join_urls,
)
from meshgpu.security import JoinToken, NodeIdentity, create_cluster, unseal

if TYPE_CHECKING:
    from consensus.node import RaftNode
    from consensus.transport import Transport
    from meshgpu.settings import AgentSettings
    from meshgpu.state.cluster import ClusterState

log = logging.getLogger(__name__)


class HostIdentity:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = s = settings
        d = s.data_dir
        # Private to this user (0700/0600), whatever an older version or a hand left behind.
        private_dir(d)
        secure_data_dir(d)
        self.path = d / "node.json"
        self.data: dict[str, Any] = (
            json.loads(self.path.read_text())
            if self.path.exists()
            else {"node_id": uuid.uuid4().hex[:12]}
        )
        self.node_id: str = self.data["node_id"]
        self.name = s.name
        self.tls = NodeIdentity(private_dir(d / "tls"))
        token_file = d / "admin.token"
        self.admin_token = token_file.read_text().strip() if token_file.exists() else ""
        # The address peers and jobs reach this host at: --advertise, else --bind, else (bound
        # to every address) the one on the route to the mesh (``choose_host``).
        self.host = s.advertise or s.bind
        self.api_port = s.api_port  # the real number once the API socket is bound
        self.api_url = ""

    @property
    def raft_id(self) -> int:
        return int(self.data.get("raft_id") or 0)

    @property
    def cluster_id(self) -> str:
        return self.data.get("cluster_id", "")

    def peers(self) -> dict[int, str]:
        """Raft id -> peer address of the members last known (founder: itself)."""
        return {int(k): v for k, v in (self.data.get("peers") or {}).items()}

    @property
    def peer_address(self) -> str:
        return host_port(self.host, self.settings.peer_port)

    def save(self) -> None:
        write_private(self.path, json.dumps(self.data))

    def _save_admin_token(self, token: str) -> None:
        with os.fdopen(open_private(self.settings.data_dir / "admin.token"), "w") as f:
            f.write(token)
        self.admin_token = token

    # Calls to other members ride the mutual-TLS peer port (``meshgpu/peer``): no HTTP client
    # of other members' APIs here, and the admin token is no node credential.

    # -- bootstrap ------------------------------------------------------------------------------
    def known_member_hosts(self) -> list[str]:
        """Hosts of the mesh known before joining it: --join targets, and (after a restart)
        the peers remembered from last time."""
        hosts = [httpx.URL(normalize_member_url(a)).host for a in self.settings.join]
        rid = str(self.data.get("raft_id"))
        for k, address in (self.data.get("peers") or {}).items():
            if k != rid and address:
                hosts.append(parse_address(address)[0])
        return hosts

    async def choose_host(self, targets: list[str]) -> None:
        """Bound to every address, with no --advertise: advertise the one on the route towards
        ``targets`` (meshgpu/mesh/address.py), and the API URL with it."""
        s = self.settings
        if not s.advertise and is_unspecified(s.bind):
            self.host = await trio.to_thread.run_sync(choose_address, s.bind, targets)
            log.info("bound to %s: advertising %s", s.bind or "every address", self.host)
        scheme = "https" if s.api_tls else "http"
        self.api_url = f"{scheme}://{host_port(self.host, self.api_port)}"

    async def establish(self) -> bool:
        """Restart as ourselves, join with a token, or found a new mesh. True when founding."""
        s = self.settings
        if self.data.get("raft_id") and self.tls.exists():
            return False  # a restart: same node, same certificate, same Raft id
        if s.token:
            await self._join(JoinToken.parse(s.token))
            return False
        self.data.update(raft_id=1, cluster_id=uuid.uuid4().hex, peers={"1": self.peer_address})
        create_cluster(self.tls, 1, hosts=(self.host, "127.0.0.1", "localhost"))
        if not self.admin_token:
            self._save_admin_token(secrets.token_urlsafe(32))
        self.save()
        return True

    async def _join(self, token: JoinToken) -> None:
        s = self.settings
        urls = [u for a in s.join for u in await resolve_join_urls(a)]
        if not urls and s.mdns:
            found = await trio.to_thread.run_sync(
                browse, token.cluster_id, s.advertise or s.bind, 10.0
            )
            urls = [m.api_url for m in found]
            await self.choose_host([httpx.URL(u).host for u in urls])
            log.info("mDNS: found %d member(s) of cluster %s", len(urls), token.cluster_id[:8])
        if not urls:
            raise JoinError(
                "no member to join: none answered on mDNS for this cluster; pass --join host:port"
            )
        if s.peer_port == 0:  # the members must learn a real port: pick a free one now
            family = socket.AF_INET6 if ":" in s.bind else socket.AF_INET
            with socket.socket(family) as probe:
                probe.bind((s.bind.strip("[]") if not is_unspecified(s.bind) else "", 0))
                s.peer_port = probe.getsockname()[1]
        result = await request_join(
            urls,
            token,
            self.tls,
            name=self.name,
            node_id=self.node_id,
            peer_address=self.peer_address,
            api_url=self.api_url,
        )
        self.data.update(
            raft_id=result.raft_id,
            cluster_id=result.cluster_id,
            peers={str(k): v for k, v in result.members.items()},
        )
        self.save()
        self._save_admin_token(result.api_token)

    def bound_peer_port(self, port: int) -> None:
        """The peer port was 0 (any free one): advertise the one bound."""
        self.settings.peer_port = port
        self.data.setdefault("peers", {})[str(self.raft_id)] = self.peer_address
        self.save()

    # -- following the replicated member list ---------------------------------------------------
    async def follow_members(
        self, cluster: ClusterState, node: RaftNode, transport: Transport | None
    ) -> None:
        """Peer addresses from the replicated member list; our CA key if a grant names us.
        Runs in a task of its own after applied entries (``follow_version``), never in the
        Raft owner task: ``node.json`` is written and the key unsealed in worker threads."""
        rid = self.data.get("raft_id")
        if transport is not None:
            for m in cluster.members.values():
                if m.raft_id != rid and not m.removed and m.peer_address:
                    transport.set_peer_address(m.raft_id, m.peer_address)
                    node.addresses[m.raft_id] = m.peer_address
        peers = {str(m.raft_id): m.peer_address for m in cluster.members.values() if not m.removed}
        if peers and peers != self.data.get("peers"):
            old, self.data["peers"] = self.data.get("peers"), peers  # for restarts
            text = json.dumps(self.data)
            try:
                await trio.to_thread.run_sync(write_private, self.path, text)
            except OSError as e:  # a full disk: tried again at the next membership change
                self.data["peers"] = old
                log.warning("cannot save the member list to %s: %s", self.path, e)
        sealed = cluster.ca_grants.get(rid) if rid else None
        if sealed and not self.tls.ca_key_path.exists():
            try:
                await trio.to_thread.run_sync(self._store_ca_key, sealed)
                log.info("received the cluster CA key (this node is a voter)")
            except Exception as e:  # a grant we cannot open is someone else's problem to fix
                log.error("cannot open the CA key granted to this node: %s", e)

    def _store_ca_key(self, sealed: str) -> None:
        self.tls.store_ca_key(unseal(bytes.fromhex(sealed), self.tls.private_key()))
