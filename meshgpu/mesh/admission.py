"""The member's side of a join, before anything is proposed: ``check_join`` validates a join
request completely -- shape and sizes, the token (known, unexpired, unused), the Ed25519
signature over every field, the time window and nonce, the CSR, and that the node id and peer
address are not someone else's. Only a request that passes is proposed to Raft (``AdmitNode``),
so an unauthenticated flood of bogus joins costs the mesh nothing but the checks.

Pure (no I/O): the agent's ``admit`` calls it with the cluster state and the time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshgpu.security.tokens import JOIN_WINDOW_S, check_join_signature
from meshgpu.state.cluster import ClusterState

MAX_CSR_BYTES = 4096  # a P-256 CSR is ~500 bytes
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_NODE_ID = re.compile(r"^[0-9a-f]{6,64}$")
_NONCE = re.compile(r"^[0-9a-f]{32}$")
_TOKEN_ID = re.compile(r"^[0-9a-f]{8}$")
_SIG = re.compile(r"^[0-9a-f]{128}$")
_ADDRESS = re.compile(r"^[A-Za-z0-9.:\[\]_-]{1,255}$")
_URL = re.compile(r"^https?://[A-Za-z0-9.:\[\]_-]{1,255}$")


class JoinRefused(Exception):
    """A join request that is refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, title: str, detail: str, code: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.code = status, title, detail, code


@dataclass(frozen=True)
class JoinRequest:
    token_id: str
    csr_pem: str
    name: str
    node_id: str
    peer_address: str
    api_url: str
    nonce: str
    ts: float


def _field(body: dict[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not pattern.match(value):
        raise JoinRefused(
            400, "malformed join request", f"{key}: expected {what}", "invalid_request"
        )
    return value


def parse_join(body: dict[str, Any]) -> tuple[JoinRequest, str]:
    """The request and its signature, or ``JoinRefused(400)`` naming the bad field."""
    csr = body.get("csr_pem")
    if not isinstance(csr, str) or len(csr) > MAX_CSR_BYTES:
        raise JoinRefused(
            400,
            "malformed join request",
            f"csr_pem: expected a PEM certificate request of at most {MAX_CSR_BYTES} bytes",
            "invalid_request",
        )
    ts = body.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise JoinRefused(400, "malformed join request", "ts: expected a number", "invalid_request")
    req = JoinRequest(
        token_id=_field(body, "token_id", _TOKEN_ID, "8 hex digits"),
        csr_pem=csr,
        name=_field(body, "name", _NAME, "a host name (letters, digits, . _ -; 1-63)"),
        node_id=_field(body, "node_id", _NODE_ID, "6-64 hex digits"),
        peer_address=_field(body, "peer_address", _ADDRESS, "host:port"),
        api_url=_field(body, "api_url", _URL, "an http(s) URL without a path"),
        nonce=_field(body, "nonce", _NONCE, "32 hex digits"),
        ts=float(ts),
    )
    for key, address in (("peer_address", req.peer_address), ("api_url", req.api_url)):
        port = address.rpartition(":")[2]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise JoinRefused(
                400,
                "malformed join request",
                f"{key}: {address!r} has no port between 1 and 65535",
                "invalid_request",
            )
    return req, _field(body, "signature", _SIG, "an Ed25519 signature (128 hex digits)")


def check_csr(csr_pem: str) -> None:
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as e:
        raise JoinRefused(
            400, "bad certificate request", f"not a PEM CSR: {e}", "invalid_csr"
        ) from None
    if not csr.is_signature_valid:
        raise JoinRefused(
            400, "bad certificate request", "the CSR's signature does not verify", "invalid_csr"
        )
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise JoinRefused(
            400, "bad certificate request", "node keys must be EC P-256", "invalid_csr"
        )


def check_join(
    body: dict[str, Any], cluster: ClusterState, now: float, seen_nonces: dict[str, float]
) -> JoinRequest:
    """Everything about a join request that can be checked before proposing it. ``seen_nonces``
    is the leader's memory of nonces it checked lately (pruned here); the state machine keeps
    those of admitted requests."""
    req, signature = parse_join(body)
    tok = cluster.tokens.get(req.token_id)
    why = cluster.token_problem(req.token_id, req.node_id, now)
    if why is not None or tok is None:
        raise JoinRefused(403, "join refused", why or "unknown join token", "bad_token")
    signed = {**body, "cluster_id": cluster.cluster_id, "ts": body["ts"]}
    if not check_join_signature(tok["verifier"], signed, signature):
        raise JoinRefused(
            403,
            "join refused",
            "the join request is not signed by this token (wrong token, another cluster, or "
            "a field changed on the way)",
            "bad_signature",
        )
    if abs(now - req.ts) > JOIN_WINDOW_S:
        raise JoinRefused(
            403,
            "join refused",
            f"the request's time is {now - req.ts:+.0f}s off this member's clock (at most "
            f"{JOIN_WINDOW_S:.0f}s allowed): sync the clocks (NTP) and join again",
            "clock_skew",
        )
    for n, t in list(seen_nonces.items()):
        if now - t > 2 * JOIN_WINDOW_S:
            del seen_nonces[n]
    if req.nonce in seen_nonces or req.nonce in tok.get("nonces", {}):
        raise JoinRefused(403, "join refused", "this join request was replayed", "replay")
    seen_nonces[req.nonce] = now
    check_csr(req.csr_pem)
    conflict = cluster.member_conflict(req.node_id, req.peer_address, req.csr_pem)
    if conflict is not None:
        raise JoinRefused(409, "join refused", conflict, "member_conflict")
    return req
