"""What this node says about the cluster: status, roles, the live members' URLs, the CA, and
whether a bearer token is the cluster's."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshgpu.errors import Unavailable
from meshgpu.security import hash_api_token
from meshgpu.security.policy import FOUNDING_ADMIN, Principal, principal_of, visible
from meshgpu.security.secrets import USER_TOKEN_PREFIX, user_token_verifier

if TYPE_CHECKING:
    from consensus.node import RaftNode
    from meshgpu.state import StateMachine
    from meshgpu.state.cluster import ClusterState


class ClusterInfo:
    def __init__(
        self,
        node: RaftNode,
        state: StateMachine,
        cluster: ClusterState,
        node_id: str,
        node_name: str,
        cluster_id: str,
        admin_token: Callable[[], str],
        ca_pem: Callable[[], str],
    ) -> None:
        self.node, self.state, self.cluster = node, state, cluster
        self.node_id, self.node_name = node_id, node_name
        self._cluster_id = cluster_id  # from node.json, until the state has one
        self.admin_token = admin_token
        self.ca_pem = ca_pem
        self._members, self._members_at = b"", -1e9

    @property
    def applied(self) -> int:
        return self.node.applied

    def cluster_id(self) -> str:
        return self.cluster.cluster_id or self._cluster_id

    def raft_status(self) -> dict[str, Any]:
        return self.node.status()

    async def read_index(self) -> None:
        """A linearizable read point: returns once this node has applied it."""
        try:
            await self.node.read_index(timeout=10)
        except Exception as e:  # Timeout while there is no leader
            raise Unavailable("no linearizable read possible now", str(e), "unavailable") from None

    def api_token_ok(self, token: str) -> bool:
        return self.principal(token) is not None

    def principal(self, token: str) -> Principal | None:
        """Who a bearer token is: the founding admin, a user by one of its live tokens (looked
        up by its verifier; expiry checked now), or None. One SHA-256 and a dict lookup."""
        if token.startswith(USER_TOKEN_PREFIX + "_"):
            access = self.cluster.access
            tok = access.by_verifier.get(user_token_verifier(token))
            if tok is None or (tok.expires_at is not None and time.time() > tok.expires_at):
                return None
            return principal_of(access, tok.user)
        expected = self.cluster.api_token_hash
        if expected:
            ok = hmac.compare_digest(hash_api_token(token), expected)
        else:
            admin = self.admin_token()
            ok = bool(admin) and hmac.compare_digest(token, admin)
        return FOUNDING_ADMIN if ok else None

    def project_token_ok(self, token: str, project: str) -> bool:
        """The ingress's ``auth: true``: a token whose user may read ``project``."""
        who = self.principal(token)
        return who is not None and visible(self.cluster.access, who, project)

    def members_header(self) -> bytes:
        """API URLs of the live members, for clients to fall back on (cached for a second)."""
        now = time.monotonic()
        if now - self._members_at > 1.0:
            self._members_at = now
            self._members = ",".join(
                n.api_url
                for n in self.state.nodes.values()
                if n.api_url and n.status != "dead" and n.node_id != self.node_id
            ).encode()
        return self._members

    def status(self) -> dict[str, Any]:
        st = self.node.status()
        return {
            "cluster_id": self.cluster_id(),
            "node_id": self.node_id,
            "node": self.node_name,
            "raft_id": self.node.id,
            "leader": st["leader"],
            "role": st["role"],
            "term": st["term"],
            "commit_index": st["commit"],
            "applied_index": st["applied"],
            "voters": st["voters"],
            "learners": st["learners"],
            "active_runs": sum(1 for r in self.state.runs.values() if not r.status.is_finished()),
            "waiting_jobs": self.state.waiting_count,
        }

    def roles(self) -> dict[str, str]:
        """node id -> leader | voter | learner (members of the Raft configuration)."""
        st = self.node.status()
        out = {}
        for m in self.cluster.members.values():
            if m.removed:
                continue
            if m.raft_id == st["leader"]:
                out[m.node_id] = "leader"
            elif m.raft_id in st["voters"]:
                out[m.node_id] = "voter"
            elif m.raft_id in st["learners"]:
                out[m.node_id] = "learner"
        return out
