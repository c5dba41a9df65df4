"""Join tokens: what a new host needs to find the cluster and prove it may join.

``mgpu1.<cluster_id>.<ca_fingerprint>.<token_id>.<secret>``. The cluster id (never the secret)
is what mDNS advertises; the CA fingerprint (SHA-256 of the CA certificate) pins the CA the
joiner must receive, so a host impersonating the cluster is detected without any prior trust;
the secret never travels: the joiner sends ``HMAC(key, csr || name)`` where ``key`` is derived
from the secret, and the cluster stores only that key (replicated, so any voter can check it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

PREFIX = "mgpu1"


class TokenError(ValueError):
    """A join token that is malformed, unknown, revoked or does not match."""


@dataclass(frozen=True, slots=True)
class JoinToken:
    cluster_id: str
    ca_fingerprint: str
    token_id: str
    secret: str

    def __str__(self) -> str:
        return ".".join((PREFIX, self.cluster_id, self.ca_fingerprint, self.token_id, self.secret))

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        parts = text.strip().split(".")
        if len(parts) != 5 or parts[0] != PREFIX or not all(parts):
            raise TokenError(
                "not a meshgpu join token (expected mgpu1.<cluster>.<ca>.<id>.<secret>); "
                "create one on a member with: meshgpu token create"
            )
        return cls(*parts[1:])

    @classmethod
    def create(cls, cluster_id: str, ca_fingerprint: str) -> JoinToken:
        return cls(
            cluster_id,
            ca_fingerprint,
            secrets.token_hex(4),
            base64.urlsafe_b64encode(secrets.token_bytes(24)).decode().rstrip("="),
        )

    def verification_key(self) -> str:
        """What the cluster stores: enough to check proofs, not the secret itself."""
        return hashlib.sha256(b"meshgpu-join-v1:" + self.secret.encode()).hexdigest()

    def proof(self, csr_pem: bytes, name: str) -> str:
        return join_proof(self.verification_key(), csr_pem, name)


def join_proof(key_hex: str, csr_pem: bytes, name: str) -> str:
    return hmac.new(
        bytes.fromhex(key_hex), csr_pem + b"\0" + name.encode(), hashlib.sha256
    ).hexdigest()


def check_proof(key_hex: str, csr_pem: bytes, name: str, proof: str) -> bool:
    return hmac.compare_digest(join_proof(key_hex, csr_pem, name), proof)


def hash_api_token(token: str) -> str:
    return hashlib.sha256(b"meshgpu-api-v1:" + token.encode()).hexdigest()
