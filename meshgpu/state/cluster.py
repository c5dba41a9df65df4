"""Cluster-level replicated state: identity, admission tokens, members and CA-key grants.

Kept apart from the jobs state (``machine.py``) and multiplexed on the same Raft log by
``Replicated``: the ``cluster`` domain of the one codec (``codec.py``), whose entries start with
``CLUSTER_TAG``. Deterministic like
every state machine here. The leader checks a join request completely (signature, time, nonce,
CSR, addresses) *before* it proposes ``AdmitNode`` (``meshgpu/mesh/admission.py``), so a bogus
request never reaches the log; apply then re-checks what a concurrent entry could have changed
(the token still usable, the nonce unused, the node id and peer address free), so every member
reaches the same verdict and the same Raft id.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from meshgpu.security.tokens import JOIN_WINDOW_S
from meshgpu.state.access import (
    ACCESS_COMMANDS,
    Access,
    CreateProject,
    DeleteProject,
    SetProjectQuota,
)
from meshgpu.state.codec import DOMAIN_TAGS, Command, decode, encode
from meshgpu.state.fleets import (
    AddBackend,
    AddFleetInstance,
    ApplyFleet,
    DeleteFleet,
    Fleets,
    ForgetFleetHost,
    ForgetFleetInstance,
    RemoveBackend,
    UpdateFleetHost,
    UpdateFleetInstance,
)
from meshgpu.state.machine import Result, StateMachine
from meshgpu.state.records import JobTerminationReason

CLUSTER_TAG = DOMAIN_TAGS["cluster"]
# Cluster commands that change a project's GPU quota: the scheduler plans again.
QUOTA_CHANGES = (CreateProject, SetProjectQuota, DeleteProject)


class _Cmd(Command):
    """A cluster command (the base of the domain)."""

    domain: ClassVar[str] = "cluster"


class InitCluster(_Cmd):
    kind: Literal["init_cluster"] = "init_cluster"
    cluster_id: str
    ca_cert_pem: str
    api_token_hash: str
    founder_raft_id: int
    founder_node_id: str
    founder_name: str
    founder_peer_address: str
    founder_api_url: str


class CreateToken(_Cmd):
    kind: Literal["create_token"] = "create_token"
    token_id: str = Field(pattern=r"^[0-9a-f]{8}$")
    # The Ed25519 public key of the token's secret (hex): checks join signatures, cannot make one.
    verifier: str = Field(pattern=r"^[0-9a-f]{64}$")
    expires_at: float | None = None
    # Single-use unless asked: the first host admitted with it uses it up.
    reusable: bool = False


class RevokeToken(_Cmd):
    kind: Literal["revoke_token"] = "revoke_token"
    token_id: str


class AdmitNode(_Cmd):
    """Proposed only after the leader verified the request's signature, time, CSR and
    addresses (``meshgpu/mesh/admission.py``)."""

    kind: Literal["admit_node"] = "admit_node"
    token_id: str
    nonce: str
    csr_pem: str
    name: str
    node_id: str
    peer_address: str
    api_url: str


class GrantCAKey(_Cmd):
    kind: Literal["grant_ca_key"] = "grant_ca_key"
    raft_id: int
    sealed_hex: str


class RemoveMember(_Cmd):
    kind: Literal["remove_member"] = "remove_member"
    raft_id: int


class NodeUnreachable(_Cmd):
    """The leader has not heard from a host for the grace period: it is dead to the scheduler,
    and the jobs it held fail with ``instance_unreachable`` (retried per their policy)."""

    kind: Literal["node_unreachable"] = "node_unreachable"
    node_id: str


class ForgetNode(_Cmd):
    """A host taken out of the mesh for good (an SSH fleet's host deleted): its unfinished jobs
    end as unreachable and its node record goes (``meshgpu nodes`` no longer lists it). A host
    that only died keeps its record (``NodeUnreachable``)."""

    kind: Literal["forget_node"] = "forget_node"
    node_id: str


class SetNodeStatus(_Cmd):
    """The leader's view of a host between "heard from" and "dead": ``unreachable`` keeps new
    work off it (its jobs keep running), ``active`` brings it back."""

    kind: Literal["set_node_status"] = "set_node_status"
    node_id: str
    # draining: an SSH fleet's host being taken out (``meshgpu/control/fleets.py``): no new work,
    # and no later ``active``/``unreachable`` brings it back.
    status: Literal["active", "unreachable", "draining"]


class InstallGossipKey(_Cmd):
    """A new cluster gossip key (hex of 32 random bytes, chosen by the proposer): members seal
    datagrams with it from when they apply this, and still open packets sealed with the key it
    replaces (kept as the secondary), so a rotation loses nothing while it spreads."""

    kind: Literal["install_gossip_key"] = "install_gossip_key"
    key_hex: str = Field(pattern=r"^[0-9a-f]{64}$")
    # Drop every other key: once a rotation has spread, the key it replaced (which a removed
    # member may still hold) stops opening packets.
    retire: bool = False


class AddSSHKey(_Cmd):
    """A user's SSH public key, for the SSH server of every host (``meshgpu/devenv/sshd.py``).
    Checked before it is proposed (``meshgpu/ops/sshkeys.py``); the same key again is a no-op."""

    kind: Literal["add_ssh_key"] = "add_ssh_key"
    fingerprint: str = Field(pattern=r"^SHA256:[A-Za-z0-9+/]{43}$")
    public_key: str  # "<type> <base64>", as parsed (no comment)
    name: str = ""
    user: str = "admin"


class RemoveSSHKey(_Cmd):
    kind: Literal["remove_ssh_key"] = "remove_ssh_key"
    fingerprint: str


def decode_cluster(data: bytes) -> Any:
    """The cluster command of an entry without its tag, or a failed Result if this build
    cannot read it."""
    try:
        return decode(CLUSTER_TAG + data)
    except ValueError as e:
        return Result(False, None, f"cannot decode cluster command: {e}", "undecodable")


encode_cluster = encode  # the one codec's: the entry carries the domain's tag


class Member(BaseModel):
    raft_id: int
    node_id: str
    name: str
    peer_address: str
    api_url: str
    joined_at: float
    csr_pem: str = ""  # the member's public key: the CA key is sealed to it on promotion
    removed: bool = False


class SSHKey(BaseModel):
    """A registered SSH public key and whose it is."""

    fingerprint: str
    public_key: str
    name: str = ""
    user: str = "admin"
    added_at: float = 0.0


def may_see(key: SSHKey, project: str, access: Access | None = None) -> bool:
    """Whether ``key`` may open sessions into jobs of ``project``: its user's role there, as
    the policy decides (``meshgpu/security/policy.py``)."""
    from meshgpu.security import policy

    if not project:
        return False
    principal = policy.principal_of(access or Access(), key.user)
    return principal is not None and policy.allowed(
        access or Access(), principal, "run.attach", project
    )


class ClusterState:
    def __init__(self) -> None:
        self.cluster_id = ""
        self.ca_cert_pem = ""
        self.api_token_hash = ""
        self.tokens: dict[str, dict[str, Any]] = {}
        self.members: dict[int, Member] = {}
        self.ca_grants: dict[int, str] = {}
        # Gossip datagram keys (hex), primary first: plaintext here like the join tokens' keys.
        # The log and snapshots travel only over mutual TLS to admitted members and rest in
        # their data dirs beside their private keys (docs/operations.md, "Gossip").
        self.gossip_keys: list[str] = []
        # When the primary gossip key was installed: how many members had been removed by then,
        # and the command's time (see ``gossip_key_action``).
        self.gossip_key_removed = 0
        self.gossip_key_at = 0.0
        self.ssh_keys: dict[str, SSHKey] = {}  # fingerprint -> key
        self.fleets = Fleets()  # SSH fleets (``meshgpu/state/fleets.py``)
        # Users, projects, tokens, secrets, audit (``meshgpu/state/access.py``).
        self.access = Access()
        self.next_raft_id = 2
        self.version = 0  # bumped on every change: the agent re-syncs peer addresses on change

    def apply_one(self, data: bytes) -> Result:
        cmd = decode_cluster(data)
        if isinstance(cmd, Result):
            return cmd
        return self.apply_cmd(cmd)

    def apply_cmd(self, cmd: Any) -> Result:
        self.version += 1
        if isinstance(cmd, ACCESS_COMMANDS):
            return Result(*self.access.apply(cmd))
        return getattr(self, "_on_" + cmd.kind)(cmd)

    def _on_init_cluster(self, c: InitCluster) -> Result:
        if self.cluster_id:
            return Result(False, None, "cluster already initialized", "exists")
        self.cluster_id, self.ca_cert_pem, self.api_token_hash = (
            c.cluster_id,
            c.ca_cert_pem,
            c.api_token_hash,
        )
        self.members[c.founder_raft_id] = Member(
            raft_id=c.founder_raft_id,
            node_id=c.founder_node_id,
            name=c.founder_name,
            peer_address=c.founder_peer_address,
            api_url=c.founder_api_url,
            joined_at=c.at,
        )
        self.next_raft_id = max(self.next_raft_id, c.founder_raft_id + 1)
        return Result(True, self.cluster_id)

    def _on_create_token(self, c: CreateToken) -> Result:
        self.tokens[c.token_id] = {
            "verifier": c.verifier,
            "created_at": c.at,
            "expires_at": c.expires_at,
            "revoked": False,
            "reusable": c.reusable,
            "used_by": [],  # node ids admitted with it
            "nonces": {},  # nonce -> time: refused when seen again within the join window
        }
        return Result(True, c.token_id)

    def token_problem(self, token_id: str, node_id: str, now: float) -> str | None:
        """Why ``token_id`` cannot admit ``node_id`` at ``now``; None when it can. A single-use
        token already used by this same node still can (the answer to its join was lost)."""
        tok = self.tokens.get(token_id)
        if tok is None or tok.get("revoked") or "verifier" not in tok:
            return "unknown or revoked join token: create a new one with meshgpu token create"
        if tok["expires_at"] is not None and now > tok["expires_at"]:
            return "the join token has expired: create a new one with meshgpu token create"
        used = tok.get("used_by", [])
        if not tok.get("reusable") and used and node_id not in used:
            return (
                "the join token was already used (tokens are single-use): create a new one with "
                "meshgpu token create, or --reusable for a token many hosts share"
            )
        return None

    def member_conflict(self, node_id: str, peer_address: str, csr_pem: str) -> str | None:
        """Why a host cannot be admitted with these identifiers; None when it can. A member that
        joins again as itself must come with the same key and addresses (a retry); nobody may
        take over another member's node id or peer address."""
        for m in self.members.values():
            if m.removed:
                continue
            if m.node_id == node_id and (m.peer_address != peer_address or m.csr_pem != csr_pem):
                return (
                    f"node id {node_id} is already member {m.raft_id} ({m.name}) with another "
                    "key or address: remove it first (meshgpu node remove) or start the new host "
                    "with a fresh data dir"
                )
            if m.node_id != node_id and m.peer_address == peer_address:
                return (
                    f"peer address {peer_address} belongs to member {m.raft_id} ({m.name}): "
                    "remove it first or give this host another --advertise/--peer-port"
                )
        return None

    def _on_revoke_token(self, c: RevokeToken) -> Result:
        tok = self.tokens.get(c.token_id)
        if tok is None:
            return Result(False, None, f"no token {c.token_id}", "not_found")
        tok["revoked"] = True
        return Result(True, c.token_id)

    def _on_add_ssh_key(self, c: AddSSHKey) -> Result:
        if c.fingerprint not in self.ssh_keys:
            self.ssh_keys[c.fingerprint] = SSHKey(
                fingerprint=c.fingerprint,
                public_key=c.public_key,
                name=c.name,
                user=c.user,
                added_at=c.at,
            )
        return Result(True, c.fingerprint)

    def _on_remove_ssh_key(self, c: RemoveSSHKey) -> Result:
        if self.ssh_keys.pop(c.fingerprint, None) is None:
            return Result(False, None, f"no SSH key {c.fingerprint}", "not_found")
        return Result(True, c.fingerprint)

    def _on_admit_node(self, c: AdmitNode) -> Result:
        why = self.token_problem(c.token_id, c.node_id, c.at)
        if why is not None:
            return Result(False, None, why, "bad_token")
        tok = self.tokens[c.token_id]
        nonces: dict[str, float] = tok.setdefault("nonces", {})
        for n, t in list(nonces.items()):
            if c.at - t > 2 * JOIN_WINDOW_S:
                del nonces[n]
        if c.nonce in nonces:
            return Result(False, None, "this join request was replayed", "replay")
        conflict = self.member_conflict(c.node_id, c.peer_address, c.csr_pem)
        if conflict is not None:
            return Result(False, None, conflict, "member_conflict")
        nonces[c.nonce] = c.at
        used: list[str] = tok.setdefault("used_by", [])
        if c.node_id not in used:
            used.append(c.node_id)
        # A node that joins again as itself (same key, same addresses) keeps its Raft id.
        m = self.member_by_node(c.node_id)
        if m is not None:
            m.api_url, m.name = c.api_url, c.name
            return Result(True, m.raft_id)
        rid = self.next_raft_id
        self.next_raft_id += 1
        self.members[rid] = Member(
            raft_id=rid,
            node_id=c.node_id,
            name=c.name,
            peer_address=c.peer_address,
            api_url=c.api_url,
            joined_at=c.at,
            csr_pem=c.csr_pem,
        )
        return Result(True, rid)

    def _on_grant_ca_key(self, c: GrantCAKey) -> Result:
        self.ca_grants[c.raft_id] = c.sealed_hex
        return Result(True, c.raft_id)

    def _on_remove_member(self, c: RemoveMember) -> Result:
        m = self.members.get(c.raft_id)
        if m is None:
            return Result(False, None, f"no member {c.raft_id}", "not_found")
        m.removed = True
        self.ca_grants.pop(c.raft_id, None)
        return Result(True, c.raft_id)

    def _on_install_gossip_key(self, c: InstallGossipKey) -> Result:
        if c.retire:
            if not self.gossip_keys or self.gossip_keys[0] != c.key_hex:
                return Result(False, None, "only the primary key can be kept alone", "stale")
            self.gossip_keys = [c.key_hex]
            return Result(True, 1)
        if self.gossip_keys and self.gossip_keys[0] == c.key_hex:
            return Result(True, len(self.gossip_keys))
        self.gossip_keys = [c.key_hex, *[k for k in self.gossip_keys if k != c.key_hex]][:2]
        self.gossip_key_removed = sum(m.removed for m in self.members.values())
        self.gossip_key_at = c.at
        return Result(True, len(self.gossip_keys))

    def gossip_key_action(self, now: float, retire_after_s: float = 30.0) -> str | None:
        """What the leader should do with the gossip keys now: ``"rotate"`` when a member was
        removed since the primary key was installed (the removed host holds it), ``"retire"``
        once a rotation is ``retire_after_s`` old (every member has had time to apply it), else
        None."""
        if not self.gossip_keys:
            return None
        if sum(m.removed for m in self.members.values()) > self.gossip_key_removed:
            return "rotate"
        if len(self.gossip_keys) > 1 and now - self.gossip_key_at >= retire_after_s:
            return "retire"
        return None

    def _on_apply_fleet(self, c: ApplyFleet) -> Result:
        return Result(*self.fleets.apply(c))

    def _on_update_fleet_host(self, c: UpdateFleetHost) -> Result:
        return Result(*self.fleets.update_host(c))

    def _on_forget_fleet_host(self, c: ForgetFleetHost) -> Result:
        return Result(*self.fleets.forget_host(c))

    def _on_delete_fleet(self, c: DeleteFleet) -> Result:
        return Result(*self.fleets.delete(c))

    def _on_add_backend(self, c: AddBackend) -> Result:
        return Result(*self.fleets.add_backend(c))

    def _on_remove_backend(self, c: RemoveBackend) -> Result:
        return Result(*self.fleets.remove_backend(c))

    def _on_add_fleet_instance(self, c: AddFleetInstance) -> Result:
        return Result(*self.fleets.add_instance(c))

    def _on_update_fleet_instance(self, c: UpdateFleetInstance) -> Result:
        return Result(*self.fleets.update_instance(c))

    def _on_forget_fleet_instance(self, c: ForgetFleetInstance) -> Result:
        return Result(*self.fleets.forget_instance(c))

    def _on_set_node_status(self, c: SetNodeStatus) -> Result:
        return Result(True, c.node_id)  # handled by ``Replicated``

    def _on_forget_node(self, c: ForgetNode) -> Result:
        return Result(True, c.node_id)  # handled by ``Replicated``

    def _on_node_unreachable(self, c: NodeUnreachable) -> Result:
        # Handled by ``Replicated``, which owns the jobs state too.
        return Result(True, c.node_id)

    def member_by_node(self, node_id: str) -> Member | None:
        return next(
            (m for m in self.members.values() if m.node_id == node_id and not m.removed), None
        )

    def snapshot_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "cluster_id": self.cluster_id,
            "ca_cert_pem": self.ca_cert_pem,
            "api_token_hash": self.api_token_hash,
            "tokens": self.tokens,
            "members": [m.model_dump() for m in self.members.values()],
            "ca_grants": {str(k): v for k, v in self.ca_grants.items()},
            "gossip_keys": self.gossip_keys,
            "gossip_key_removed": self.gossip_key_removed,
            "gossip_key_at": self.gossip_key_at,
            "next_raft_id": self.next_raft_id,
        }
        if self.ssh_keys:  # absent when there are none: older snapshots keep their shape
            doc["ssh_keys"] = [k.model_dump() for k in self.ssh_keys.values()]
        if self.fleets.fleets:  # likewise
            doc["fleets"] = self.fleets.snapshot()
        if self.fleets.backends:  # likewise
            doc["backends"] = self.fleets.snapshot_backends()
        if not self.access.empty():  # likewise
            doc["access"] = self.access.snapshot()
        return doc

    def restore_doc(self, doc: dict[str, Any]) -> None:
        self.cluster_id = doc.get("cluster_id", "")
        self.ca_cert_pem = doc.get("ca_cert_pem", "")
        self.api_token_hash = doc.get("api_token_hash", "")
        self.tokens = doc.get("tokens", {})
        self.members = {m["raft_id"]: Member.model_validate(m) for m in doc.get("members", [])}
        self.ca_grants = {int(k): v for k, v in doc.get("ca_grants", {}).items()}
        self.gossip_keys = list(doc.get("gossip_keys", []))
        self.gossip_key_removed = int(doc.get("gossip_key_removed", 0))
        self.gossip_key_at = float(doc.get("gossip_key_at", 0.0))
        self.ssh_keys = {
            k["fingerprint"]: SSHKey.model_validate(k) for k in doc.get("ssh_keys", [])
        }
        self.fleets.restore(doc.get("fleets", []))
        self.fleets.restore_backends(doc.get("backends", []))
        self.access.restore(doc.get("access", {}))
        self.next_raft_id = doc.get("next_raft_id", 2)
        self.version += 1


class Replicated:
    """The node's one state machine: jobs state and cluster state on one log."""

    def __init__(self) -> None:
        self.cluster = ClusterState()
        self.jobs = StateMachine()

    @property
    def jobs(self) -> StateMachine:
        return self._jobs

    @jobs.setter
    def jobs(self, machine: StateMachine) -> None:
        # Submit and stop are recorded in the cluster's audit trail as they apply.
        self._jobs = machine
        machine.on_audit = lambda at, action, user, project, target: self.cluster.access.audit(
            at, action, user, project, target
        )
        machine.quota_of = lambda project: self.cluster.access.quota_of(project)

    def apply(self, batch: list[tuple[int, bytes]]) -> list[Result]:
        """Apply committed entries ``(index, data)`` in order, each to its domain."""
        results: list[Result] = []
        jobs: list[tuple[int, bytes]] = []
        for index, data in batch:
            if data[:1] == CLUSTER_TAG:
                if jobs:
                    results.extend(self.jobs.apply(jobs))
                    jobs = []
                self.jobs.applied_index = index
                cmd = decode_cluster(data[1:])
                if isinstance(cmd, Result):
                    results.append(cmd)
                    continue
                results.append(self.cluster.apply_cmd(cmd))
                if isinstance(cmd, QUOTA_CHANGES):
                    self.jobs.demand_version += 1  # a quota moved: plan again
                if isinstance(cmd, NodeUnreachable):
                    self._node_unreachable(cmd)
                elif isinstance(cmd, ForgetNode):
                    self._node_unreachable(NodeUnreachable(at=cmd.at, node_id=cmd.node_id))
                    self.jobs.forget_node(cmd.node_id)
                elif isinstance(cmd, SetNodeStatus):
                    node = self.jobs.nodes.get(cmd.node_id)
                    if node is not None and node.status in ("active", "unreachable"):
                        self.jobs.set_node_status(cmd.node_id, cmd.status)
            else:
                jobs.append((index, data))
        if jobs:
            results.extend(self.jobs.apply(jobs))
        return results

    def _node_unreachable(self, c: NodeUnreachable) -> None:
        jobs = self.jobs
        node = jobs.nodes.get(c.node_id)
        if node is None:
            return
        jobs.set_node_status(c.node_id, "dead")
        jobs.fail_node_jobs(
            c.node_id,
            JobTerminationReason.INSTANCE_UNREACHABLE,
            c.at,
            f"host {node.name} unreachable",
        )

    def snapshot(self) -> bytes:
        return self.snapshot_view()()

    def snapshot_view(self) -> Callable[[], bytes]:
        """A consistent copy, taken now, and the function that encodes it (which the Raft node
        runs in a worker thread: see ``StateMachine.snapshot_view``)."""
        jobs = self.jobs.snapshot_view()
        cluster = json.dumps(self.cluster.snapshot_doc(), separators=(",", ":")).encode()
        return lambda: b'{"jobs":' + jobs() + b',"cluster":' + cluster + b"}"

    def restore(self, data: bytes) -> None:
        doc = json.loads(data) if data else {}
        self.jobs.restore(json.dumps(doc.get("jobs", {})).encode())
        self.cluster.restore_doc(doc.get("cluster", {}))
