"""A new host's join: checked completely before anything is proposed
(``meshgpu/mesh/admission.py``), admitted by the leader, its certificate signed there; a
follower forwards the request to the leader."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import meshgpu
from consensus.core import Role
from meshgpu.errors import Conflict, Denied, Invalid, MeshError, Unavailable
from meshgpu.mesh.admission import JoinRefused, check_join
from meshgpu.security import PKIError, seal, sign_csr
from meshgpu.state.cluster import AdmitNode, encode_cluster

if TYPE_CHECKING:
    from consensus.node import RaftNode
    from meshgpu.ops.peers import Peers
    from meshgpu.replica.proposer import Proposer
    from meshgpu.security import NodeIdentity
    from meshgpu.state.cluster import ClusterState

_REFUSED: dict[int, type[MeshError]] = {400: Invalid, 403: Denied, 409: Conflict}


class Admission:
    def __init__(
        self,
        node: RaftNode,
        cluster: ClusterState,
        tls: NodeIdentity,
        proposer: Proposer,
        admin_token: Callable[[], str],
        peers: Peers,
    ) -> None:
        self.node, self.cluster, self.tls, self.proposer = node, cluster, tls, proposer
        self.admin_token = admin_token
        self.peers = peers  # a follower forwards joins to the leader over the peer port
        self._nonces: dict[str, float] = {}  # nonces of join requests checked lately

    async def admit(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/v1/join`` on the leader (a follower forwards it there)."""
        node = self.node
        if not node.leader:
            raise Unavailable("no leader right now", "retry in a few seconds", "unavailable")
        if node.role is not Role.LEADER:
            return await self._forward(body)
        return await self._admit(body)

    async def admit_forwarded(self, body: dict[str, Any]) -> dict[str, Any]:
        """A join a follower forwarded here over the peer port: answered by the leader only. A
        member that lost the leadership meanwhile says so (the joiner retries) rather than
        forwarding again."""
        if self.node.role is not Role.LEADER:
            raise Unavailable("not the leader", "retry in a few seconds", "not_leader")
        return await self._admit(body)

    async def _admit(self, body: dict[str, Any]) -> dict[str, Any]:
        theirs = body.get("agent_version")
        if theirs != meshgpu.__version__:
            raise Conflict(
                "join refused: another meshgpu version",
                f"this host runs meshgpu {theirs or 'older than 0.1.0'} and the mesh runs "
                f"{meshgpu.__version__}: install meshgpu {meshgpu.__version__} on it (an SSH "
                "fleet copies the mesh's own agent file)",
                "version_mismatch",
            )
        node = self.node
        try:
            req = check_join(body, self.cluster, time.time(), self._nonces)
        except JoinRefused as e:
            raise _REFUSED.get(e.status, Invalid)(e.title, e.detail, e.code) from None
        ca = self.tls.ca()
        if ca is None:
            raise Unavailable(
                "this leader cannot sign certificates yet", "retry shortly", "unavailable"
            )
        cmd = AdmitNode(
            at=time.time(),
            token_id=req.token_id,
            nonce=req.nonce,
            csr_pem=req.csr_pem,
            name=req.name,
            node_id=req.node_id,
            peer_address=req.peer_address,
            api_url=req.api_url,
        )
        result = await self.proposer.propose(encode_cluster(cmd))
        if result.code == "duplicate":  # applied before, its answer forgotten: ask again
            raise Unavailable("join in progress", "retry the join shortly", "unavailable")
        if not result.ok:
            kind = Conflict if result.code == "member_conflict" else Denied
            raise kind("join refused", result.error, result.code)
        rid = int(result.value)
        host = cmd.peer_address.rpartition(":")[0].strip("[]")
        try:
            cert = sign_csr(ca, cmd.csr_pem.encode(), rid, hosts=(host, "127.0.0.1", "localhost"))
        except PKIError as e:
            raise Invalid("bad certificate request", str(e), "invalid_csr") from None
        st = node.status()
        if rid not in st["voters"] and rid not in st["learners"]:
            await node.add_learner(rid, cmd.peer_address)
        return {
            "raft_id": rid,
            "cert_pem": cert.decode(),
            "ca_pem": self.tls.files.ca_cert.read_text(),
            "cluster_id": self.cluster.cluster_id,
            "members": {
                str(m.raft_id): m.peer_address
                for m in self.cluster.members.values()
                if not m.removed
            },
            # Sealed to the key of the CSR: only the host that holds that key (the one whose
            # signed request was checked) can read the token, even where the join travels
            # over plain HTTP (--api-tls off).
            "api_token_sealed": seal(self.admin_token().encode(), cmd.csr_pem.encode()).hex(),
        }

    async def _forward(self, body: dict[str, Any]) -> dict[str, Any]:
        leader = self.cluster.members.get(self.node.leader)
        if leader is None:
            raise Unavailable("leader unknown", "retry in a few seconds", "unavailable")
        try:
            return await self.peers.join(leader.node_id, body, timeout=30)
        except Unavailable as e:
            if e.code == "not_leader":  # it stepped down meanwhile: the joiner retries
                raise
            raise Unavailable(
                "the leader did not answer", f"retry shortly ({e})", "unavailable"
            ) from None
        # The leader's refusal (Invalid, Denied, Conflict, ...) passes on as the kind it is.
