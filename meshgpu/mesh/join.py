"""Joining a mesh: the new host's side (``request_join``); the member's side is
``Agent.admit``.

The joiner generates its own key, sends a CSR with ``HMAC(token key, csr || name)`` to any
member's API (``POST /api/v1/join``; no bearer token -- the proof is the credential), and gets
back its Raft id, a certificate signed by the cluster CA, the CA certificate and the members'
peer addresses. It trusts the answer only if the CA certificate's fingerprint is the one in its
token and the certificate chains to it, so a host impersonating the cluster is caught without
prior trust. The member forwards the request to the leader, which checks the proof through Raft
(``AdmitNode``), signs the CSR and adds the host as a learner.

Why the API port and not the peer port: the peer port speaks only mutual TLS, which a host
without a certificate yet cannot complete; the join needs no TLS: the proof is bound to the CSR (a replayed request only
gets a certificate for someone else's key), the reply is verified against the pinned CA, and the
one secret in it, the cluster API token, is sealed to the CSR's public key (ECDH + AES-GCM), so
an eavesdropper learns nothing it can use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.exceptions import InvalidTag

from meshgpu.security import (
    JoinToken,
    NodeIdentity,
    PKIError,
    fingerprint,
    unseal,
    verify_node_cert,
)

log = logging.getLogger(__name__)


class JoinError(RuntimeError):
    """Joining failed; the message says why and what to do."""


@dataclass
class JoinResult:
    raft_id: int
    cluster_id: str
    members: dict[int, str]  # raft id -> peer address
    api_token: str


def join_urls(address: str, api_port: int = 7480) -> list[str]:
    """API URLs to try for a ``--join`` address. INTERFACE.md's form is a member's *peer*
    address (``host:7481``), and people also pass its API address: a ``host:port`` whose port is
    not the API's is tried as given, then at the default API port of the same host (the peer
    port speaks only mutual TLS, so a plain-HTTP join there fails at once)."""
    url = normalize_member_url(address, api_port)
    if address.startswith(("http://", "https://")):
        return [url]
    parsed = httpx.URL(url)
    if parsed.port == api_port:
        return [url]
    return [url, str(parsed.copy_with(port=api_port)).rstrip("/")]


def normalize_member_url(address: str, default_port: int = 7480) -> str:
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        host, port = address, str(default_port)
    return f"http://{host}:{port}"


async def request_join(
    urls: list[str],
    token: JoinToken,
    identity: NodeIdentity,
    *,
    name: str,
    node_id: str,
    peer_address: str,
    api_url: str,
    timeout: float = 30.0,
) -> JoinResult:
    csr = identity.csr_pem(name)
    body = {
        "token_id": token.token_id,
        "proof": token.proof(csr, name),
        "csr_pem": csr.decode(),
        "name": name,
        "node_id": node_id,
        "peer_address": peer_address,
        "api_url": api_url,
    }
    errors = []
    async with httpx.AsyncClient(timeout=timeout) as client:
        for url in urls:
            try:
                r = await client.post(f"{url}/api/v1/join", json=body)
            except httpx.TransportError as e:
                errors.append(f"{url}: {type(e).__name__} {e}")
                continue
            if r.status_code == 403:
                raise JoinError(f"the mesh refused this host: {r.json().get('detail', r.text)}")
            if r.status_code >= 400:
                errors.append(f"{url}: HTTP {r.status_code} {r.text[:200]}")
                continue
            doc: dict[str, Any] = r.json()
            ca_pem, cert_pem = doc["ca_pem"].encode(), doc["cert_pem"].encode()
            if fingerprint(ca_pem) != token.ca_fingerprint:
                raise JoinError(
                    f"{url} presented a CA that does not match the token: not this mesh"
                )
            if doc["cluster_id"] != token.cluster_id:
                raise JoinError(
                    f"{url} belongs to cluster {doc['cluster_id']}, the token to {token.cluster_id}"
                )
            try:
                verify_node_cert(ca_pem, cert_pem, int(doc["raft_id"]))
            except PKIError as e:
                raise JoinError(str(e)) from None
            try:
                api_token = unseal(
                    bytes.fromhex(doc["api_token_sealed"]), identity.private_key()
                ).decode()
            except (KeyError, ValueError, InvalidTag) as e:
                raise JoinError(f"{url} sent an API token this host cannot open: {e!r}") from None
            identity.install(ca_pem, cert_pem)
            return JoinResult(
                int(doc["raft_id"]),
                doc["cluster_id"],
                {int(k): v for k, v in doc["members"].items()},
                api_token,
            )
    raise JoinError(
        "no member answered: " + "; ".join(errors) if errors else "no member address to try"
    )
