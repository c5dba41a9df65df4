"""The founding agent's first entries: the cluster (its CA, the admin token's verifier, itself
as the first member) and a reusable join token for a day, written to ``join-token.json``."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

from meshgpu.security import hash_api_token
from meshgpu.state.cluster import InitCluster, encode_cluster

if TYPE_CHECKING:
    from meshgpu.host.identity import HostIdentity
    from meshgpu.ops import Tokens
    from meshgpu.replica.proposer import Proposer

# The founding agent's join token (join-token.json): many hosts may join with it, for a day.
STARTUP_TOKEN_TTL_S = 86400.0


async def found_cluster(identity: HostIdentity, proposer: Proposer, tokens: Tokens) -> str:
    """Propose the cluster; returns the startup join token."""
    await proposer.propose(
        encode_cluster(
            InitCluster(
                at=time.time(),
                cluster_id=identity.cluster_id,
                ca_cert_pem=identity.tls.files.ca_cert.read_text(),
                api_token_hash=hash_api_token(identity.admin_token),
                founder_raft_id=1,
                founder_node_id=identity.node_id,
                founder_name=identity.name,
                founder_peer_address=identity.peer_address,
                founder_api_url=identity.api_url,
            )
        )
    )
    token = await tokens.create(STARTUP_TOKEN_TTL_S, reusable=True)
    path = identity.settings.data_dir / "join-token.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(
            {
                "token": token,
                "join": identity.peer_address,
                "api_url": identity.api_url,
                "expires_at": time.time() + STARTUP_TOKEN_TTL_S,
                "reusable": True,
            },
            f,
        )
    return token
