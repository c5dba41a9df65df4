"""Cluster identity and admission: the CA, node certificates, join tokens, API tokens."""

from meshgpu.security.pki import (
    NodeIdentity,
    PKIError,
    create_cluster,
    fingerprint,
    seal,
    sign_csr,
    unseal,
    verify_node_cert,
)
from meshgpu.security.tokens import (
    JoinToken,
    TokenError,
    check_join_signature,
    hash_api_token,
)

__all__ = [
    "JoinToken",
    "NodeIdentity",
    "PKIError",
    "TokenError",
    "check_join_signature",
    "create_cluster",
    "fingerprint",
    "hash_api_token",
    "seal",
    "sign_csr",
    "unseal",
    "verify_node_cert",
]
