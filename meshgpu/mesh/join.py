"""Joining a mesh: the new host's side (``request_join``); the member's side is
``meshgpu/ops/admission.py`` with ``meshgpu/mesh/admission.py``.

The joiner generates its own key and sends a CSR, its name, node id and addresses, a fresh nonce
and the time, all signed with the token's Ed25519 secret, to any member's API
(``POST /api/v1/join``; no bearer token -- the signature is the credential). It gets back its
Raft id, a certificate signed by the cluster CA, the CA certificate and the members' peer
addresses.

The API speaks TLS with a certificate from the cluster CA. The joiner has no CA yet, only its
fingerprint in the token (as kubeadm's discovery does): it fetches the CA certificate
(``GET /api/v1/join/ca``), checks the fingerprint, and sends the join over a connection that
verifies the member's certificate against that CA. The secret never travels either way (only a
signature does), the reply is checked against the pinned CA again, and the one secret in it, the
cluster API token, is sealed to the CSR's public key (ECDH + AES-GCM). A member that serves its
API without TLS (``--api-tls off``, behind a TLS-terminating proxy) is joined over plain HTTP with
the same guarantees: a captured request cannot be replayed (nonce, time) nor re-pointed at other
addresses (signed), and its answer is useless to anyone but the joiner.

``--join`` takes a member's *peer* address (``host:7481``, INTERFACE.md) or its API address. A
peer port answers a small UDP question -- where is your API? -- so a member is joinable through
its peer address whatever its API port (``ask_api_url``); when nothing answers, the address is
tried as an API address, then at the default API port of the same host.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import httpx
import trio
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


# The UDP question a peer port answers (``answer_api_query``), padded so the answer is never
# larger than the question (no amplification), and the answer's prefix.
API_QUERY = b"MESHGPU-WHERE-IS-API/1\n"
API_QUERY_SIZE = 512
API_ANSWER = b"MESHGPU-API/1 "


def api_query_packet() -> bytes:
    return API_QUERY.ljust(API_QUERY_SIZE, b"\0")


def answer_api_query(data: bytes, api_url: str) -> bytes | None:
    """The answer to a datagram that asks where this member's API is; None for anything else."""
    if len(data) < API_QUERY_SIZE or not data.startswith(API_QUERY) or not api_url:
        return None
    return API_ANSWER + api_url.encode()


async def ask_api_url(address: str, timeout: float = 1.5) -> str | None:
    """The API URL of the member whose *peer* address is ``address`` (``host:port``), asked
    over UDP; None when nothing answers (not a peer port, or UDP filtered)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]")
    try:
        infos = await trio.socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)
    except OSError:
        return None
    if not infos:
        return None
    family, _, _, _, sockaddr = infos[0]
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock, trio.move_on_after(timeout):
        await sock.connect(sockaddr)
        for _ in range(3):  # UDP: ask again if a datagram was lost
            await sock.send(api_query_packet())
            with trio.move_on_after(timeout / 3):
                try:
                    data = await sock.recv(1024)
                except OSError:  # ICMP port unreachable: nothing listens there
                    return None
                if data.startswith(API_ANSWER):
                    url = data[len(API_ANSWER) :].decode(errors="replace").strip()
                    if url.startswith(("http://", "https://")):
                        return url.rstrip("/")
    return None


async def resolve_join_urls(address: str, api_port: int = 7480) -> list[str]:
    """API URLs to try for one ``--join`` address, the one a peer port names first."""
    urls = join_urls(address, api_port)
    if not address.startswith(("http://", "https://")):
        found = await ask_api_url(address)
        if found:
            urls = [found, *[u for u in urls if u != found]]
    return urls


def join_urls(address: str, api_port: int = 7480) -> list[str]:
    """API URLs to try for a ``--join`` address. INTERFACE.md's form is a member's *peer*
    address (``host:7481``), and people also pass its API address: a ``host:port`` whose port is
    not the API's is tried as given, then at the default API port of the same host (the peer
    port speaks only mutual TLS, so a join there fails at once). Without a scheme, HTTPS is
    tried and plain HTTP after it (``request_join``)."""
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
    return f"https://{host}:{port}"


def pinned_context(ca_pem: bytes) -> ssl.SSLContext:
    """A client context that trusts only the cluster CA. Host names are not checked: the
    cluster CA signs member certificates only, so a certificate from it proves a member of this
    cluster, whatever name or address the member was reached at (NAT, a load balancer, a
    renamed host)."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.check_hostname = False
    return ctx


async def _fetch_ca(url: str, token: JoinToken, timeout: float) -> bytes:
    """The member's CA certificate, read over an unverified connection and then checked against
    the fingerprint in the token (the token is the trust anchor)."""
    async with httpx.AsyncClient(timeout=timeout, verify=False) as client:  # noqa: S501
        r = await client.get(f"{url}/api/v1/join/ca")
    if r.status_code != 200:
        raise httpx.HTTPStatusError(f"HTTP {r.status_code}", request=r.request, response=r)
    ca_pem = r.json()["ca_pem"].encode()
    if fingerprint(ca_pem) != token.ca_fingerprint:
        raise JoinError(f"{url} presented a CA that does not match the token: not this mesh")
    return ca_pem


def _candidates(urls: list[str]) -> list[str]:
    """Each URL, and for an https URL the same address over plain HTTP after it (a member
    that serves its API without TLS, ``--api-tls off``)."""
    out: list[str] = []
    for u in urls:
        out.append(u)
        if u.startswith("https://"):
            out.append("http://" + u.removeprefix("https://"))
    return list(dict.fromkeys(out))


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
    errors = []
    for url in _candidates(urls):
        try:
            verify: ssl.SSLContext | bool = True
            if url.startswith("https://"):
                verify = pinned_context(await _fetch_ca(url, token, timeout))
            # A fresh nonce and time per attempt: a member refuses a nonce it has seen.
            body = token.join_request(
                csr.decode(),
                name=name,
                node_id=node_id,
                peer_address=peer_address,
                api_url=api_url,
            )
            async with httpx.AsyncClient(timeout=timeout, verify=verify) as client:
                r = await client.post(f"{url}/api/v1/join", json=body)
        except (httpx.TransportError, httpx.HTTPStatusError, ValueError, KeyError) as e:
            errors.append(f"{url}: {type(e).__name__} {e}")
            continue
        if r.status_code in (403, 409):
            raise JoinError(f"the mesh refused this host: {r.json().get('detail', r.text)}")
        if r.status_code >= 400:
            errors.append(f"{url}: HTTP {r.status_code} {r.text[:200]}")
            continue
        doc: dict[str, Any] = r.json()
        ca_pem, cert_pem = doc["ca_pem"].encode(), doc["cert_pem"].encode()
        if fingerprint(ca_pem) != token.ca_fingerprint:
            raise JoinError(f"{url} presented a CA that does not match the token: not this mesh")
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
