"""Join tokens: created (only the verifier enters the state) and revoked."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshgpu.errors import NotFound
from meshgpu.security import JoinToken
from meshgpu.state.cluster import CreateToken, RevokeToken, encode_cluster

if TYPE_CHECKING:
    from meshgpu.replica.proposer import Proposer


class Tokens:
    def __init__(
        self, proposer: Proposer, cluster_id: Callable[[], str], ca_fingerprint: Callable[[], str]
    ) -> None:
        self.proposer = proposer
        self.cluster_id, self.ca_fingerprint = cluster_id, ca_fingerprint

    async def create(self, ttl_s: float | None, reusable: bool = False) -> str:
        """A new join token; ``ttl_s`` None: it never expires. Only its verifier (a public
        key) enters the replicated state."""
        token = JoinToken.create(self.cluster_id(), self.ca_fingerprint())
        await self.proposer.propose(
            encode_cluster(
                CreateToken(
                    at=time.time(),
                    token_id=token.token_id,
                    verifier=token.verifier(),
                    expires_at=time.time() + ttl_s if ttl_s else None,
                    reusable=reusable,
                )
            )
        )
        return str(token)

    async def revoke(self, token_id: str) -> None:
        cmd = RevokeToken(at=time.time(), token_id=token_id)
        result = await self.proposer.propose(encode_cluster(cmd))
        if not result.ok:
            raise NotFound("token not found", result.error, result.code)
