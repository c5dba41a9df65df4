"""Users' SSH public keys: registered (checked here, then proposed), listed and removed. The
SSH server of every host (``meshgpu/devenv/sshd.py``) reads them from the replicated state."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from meshgpu.errors import Invalid, NotFound
from meshgpu.security.sshkeys import BadPublicKey, parse_public_key
from meshgpu.state.cluster import AddSSHKey, RemoveSSHKey, SSHKey, encode_cluster

if TYPE_CHECKING:
    from meshgpu.replica.proposer import Proposer
    from meshgpu.state.cluster import ClusterState

MAX_NAME = 200


def key_view(key: SSHKey) -> dict[str, Any]:
    return {
        "fingerprint": key.fingerprint,
        "public_key": key.public_key,
        "name": key.name,
        "user": key.user,
        "added_at": key.added_at,
    }


class SSHKeys:
    def __init__(self, proposer: Proposer, cluster: ClusterState) -> None:
        self.proposer, self.cluster = proposer, cluster

    async def add(self, public_key: str, name: str = "", user: str = "admin") -> dict[str, Any]:
        """Register a key (the same key again changes nothing). A malformed one is
        ``Invalid`` with the reason."""
        try:
            key = parse_public_key(public_key)
        except BadPublicKey as e:
            raise Invalid("malformed SSH public key", str(e), "invalid_ssh_key") from None
        name = (name or key.comment)[:MAX_NAME]
        cmd = AddSSHKey(
            at=time.time(),
            fingerprint=key.fingerprint,
            public_key=key.openssh,
            name=name,
            user=user,
        )
        await self.proposer.propose(encode_cluster(cmd))
        stored = self.cluster.ssh_keys.get(key.fingerprint)
        return key_view(stored) if stored is not None else {"fingerprint": key.fingerprint}

    def list(self) -> list[dict[str, Any]]:
        return [
            key_view(k) for k in sorted(self.cluster.ssh_keys.values(), key=lambda k: k.added_at)
        ]

    async def remove(self, fingerprint: str, user: str | None = None) -> None:
        """Remove a key (``user``: only if it is that user's)."""
        fp = fingerprint if fingerprint.startswith("SHA256:") else f"SHA256:{fingerprint}"
        key = self.cluster.ssh_keys.get(fp)
        if user is not None and (key is None or key.user != user):
            raise NotFound("SSH key not found", f"no SSH key {fp} of yours", "not_found")
        result = await self.proposer.propose(
            encode_cluster(RemoveSSHKey(at=time.time(), fingerprint=fp))
        )
        if not result.ok:
            raise NotFound("SSH key not found", result.error, result.code)
