"""Join tokens: what a new host needs to find the cluster and prove it may join.

``mgpu2.<cluster_id>.<ca_fingerprint>.<token_id>.<secret>``. The cluster id (never the secret)
is what mDNS advertises; the CA fingerprint (SHA-256 of the CA certificate) pins the CA the
joiner must receive, so a host impersonating the cluster is detected without any prior trust.

The secret is the 32-byte seed of an Ed25519 key pair, and it never travels: the joiner *signs*
its join request -- the cluster and token ids, its CSR, name, node id, peer and API addresses, a
fresh nonce and the time -- and the cluster stores only the public key (``verifier``), which
can check signatures but never make one. So the replicated log, every snapshot and every
member's data dir hold nothing that lets anyone join, a captured request cannot be replayed
(nonce and time) or re-pointed at other addresses (they are signed), and a request that does
not verify is refused before anything is proposed to Raft.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import meshgpu

PREFIX = "mgpu2"
# How far a join request's time may be from the admitting leader's clock, and so how long its
# nonce must be remembered to refuse a replay.
JOIN_WINDOW_S = 300.0
# The fields a join signature covers, in this order.
SIGNED_FIELDS = (
    "cluster_id",
    "token_id",
    "csr_pem",
    "name",
    "node_id",
    "peer_address",
    "api_url",
    "nonce",
    "ts",
)


class TokenError(ValueError):
    """A join token that is malformed, unknown, revoked or does not match."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


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
        if len(parts) == 5 and parts[0] == "mgpu1":
            raise TokenError(
                "this join token is from an older meshgpu (mgpu1); create a new one on a member "
                "with: meshgpu token create"
            )
        if len(parts) != 5 or parts[0] != PREFIX or not all(parts):
            raise TokenError(
                f"not a meshgpu join token (expected {PREFIX}.<cluster>.<ca>.<id>.<secret>); "
                "create one on a member with: meshgpu token create"
            )
        token = cls(*parts[1:])
        try:
            seed = _unb64(token.secret)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise TokenError("the join token's secret is damaged: copy the whole token again")
        return token

    @classmethod
    def create(cls, cluster_id: str, ca_fingerprint: str) -> JoinToken:
        return cls(cluster_id, ca_fingerprint, secrets.token_hex(4), _b64(secrets.token_bytes(32)))

    def _key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(_unb64(self.secret))

    def verifier(self) -> str:
        """What the cluster stores: the public half (hex), enough to check a signature and
        useless to make one."""
        return (
            self._key()
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            .hex()
        )

    def sign_join(self, request: dict[str, Any]) -> str:
        """The signature (hex) over a join request's ``SIGNED_FIELDS``."""
        return self._key().sign(join_message(request)).hex()

    def join_request(self, csr_pem: str, **fields: Any) -> dict[str, Any]:
        """A signed join request: ``fields`` (name, node_id, peer_address, api_url; a test may
        override any other) with this token's id, a fresh nonce and the time."""
        body = {
            "token_id": self.token_id,
            "csr_pem": csr_pem,
            "nonce": secrets.token_hex(16),
            "ts": int(time.time()),
        } | fields
        body["signature"] = self.sign_join({**body, "cluster_id": self.cluster_id})
        # Not signed (it grants nothing): a member refuses another version (ops/admission.py).
        body.setdefault("agent_version", meshgpu.__version__)
        return body


def join_message(request: dict[str, Any]) -> bytes:
    """The bytes a join signature covers: the signed fields as canonical JSON (the CSR by its
    SHA-256), domain-separated."""
    doc = {k: request.get(k) for k in SIGNED_FIELDS}
    doc["csr_pem"] = hashlib.sha256(str(doc["csr_pem"]).encode()).hexdigest()
    return b"meshgpu-join-v2\0" + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def check_join_signature(verifier_hex: str, request: dict[str, Any], signature_hex: str) -> bool:
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(verifier_hex))
        key.verify(bytes.fromhex(signature_hex), join_message(request))
    except (ValueError, InvalidSignature):
        return False
    return True


def hash_api_token(token: str) -> str:
    return hashlib.sha256(b"meshgpu-api-v1:" + token.encode()).hexdigest()
