"""The use cases of one node, assembled (``Services``): what the API and the peer calls answer
with. The composition root (``meshgpu/agent.py``) calls ``assemble`` once its parts exist."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshgpu.ops import (
    AccessOps,
    Admission,
    Backends,
    ClusterInfo,
    Code,
    Fleets,
    Logs,
    Metrics,
    Runs,
    Services,
    SSHKeys,
    Tokens,
)
from meshgpu.security import fingerprint
from meshgpu.services.ingress import Ingress, IngressSettings
from meshgpu.services.rates import ServiceRates
from meshgpu.services.stats import ServiceCounters

if TYPE_CHECKING:
    from meshgpu.gpu import GPUProvider
    from meshgpu.replica.proposer import Proposer
    from meshgpu.runner import ProcessRunner
    from meshgpu.runner.code import CodeStore
    from meshgpu.settings import AgentSettings


@dataclass(frozen=True, slots=True)
class Parts:
    """This host's parts the use cases act through."""

    code: CodeStore
    runner: ProcessRunner
    gpus: GPUProvider
    peer: Any  # PeerClient: members' logs, metrics, code, join forwarding
    counters: ServiceCounters


def assemble(
    s: AgentSettings,
    ident: Any,  # HostIdentity
    node_name: str,
    node: Any,  # RaftNode
    proposer: Proposer,
    replicated: Any,  # Replicated: jobs + cluster
    gossip: Any,  # MeshGossip
    parts: Parts,
) -> Services:
    state, cluster = replicated.jobs, replicated.cluster
    cluster_info = ClusterInfo(
        node,
        state,
        cluster,
        ident.node_id,
        node_name,
        ident.cluster_id,
        lambda: ident.admin_token,
        ident.tls.files.ca_cert.read_text,
    )
    access = AccessOps(
        proposer,
        cluster,
        state,
        ident.tls.files.ca_cert.read_bytes,
        ident.tls.ca_key_path,
    )
    return Services(
        node_id=ident.node_id,
        node_name=node_name,
        state=state,
        cluster=cluster_info,
        runs=Runs(state, proposer, parts.code, ident.node_id, access.check_references),
        access=access,
        logs=Logs(state, parts.runner, ident.node_id, parts.peer),
        metrics=Metrics(state, parts.runner, parts.gpus, ident.node_id, node_name, parts.peer),
        code=Code(parts.code, state, ident.node_id, s.code_copies, s.code_limit),
        tokens=Tokens(
            proposer,
            lambda: ident.cluster_id,
            lambda: fingerprint(ident.tls.files.ca_cert.read_bytes()),
        ),
        admission=Admission(
            node, cluster, ident.tls, proposer, lambda: ident.admin_token, parts.peer
        ),
        gossip=gossip,
        gpus=parts.gpus,
        runner=parts.runner,
        ssh_keys=SSHKeys(proposer, cluster),
        fleets=Fleets(proposer, cluster, state),
        backends=Backends(
            proposer,
            cluster,
            _agent_file(s),
            node=node,
            peers=parts.peer,
            ca_key_path=ident.tls.ca_key_path,
        ),
        ingress=Ingress(
            state,
            ident.node_id,
            cluster_info.project_token_ok,
            parts.counters,
            IngressSettings(domain=s.ingress_domain, activation_timeout_s=s.activation_timeout_s),
        ),
        counters=parts.counters,
        rates=ServiceRates(
            state,
            gossip.service_counters,
            ident.node_id,
            parts.counters.snapshot,
            domain=s.ingress_domain,
        ),
    )


def _agent_file(s: AgentSettings) -> Any:
    """() -> the file new hosts get from this node (``fleets/pyz.agent_file``; blocking)."""
    from meshgpu.fleets.pyz import agent_file

    cache = s.data_dir / "dist"
    return lambda: agent_file(cache)
