"""Cluster PKI and mutual-TLS contexts for the Raft transport.

Identity convention: node ``7`` holds a certificate with subject ``CN=node-7`` and a
``DNSName("node-7")`` SAN (plus ``localhost`` and ``127.0.0.1`` by default), signed by the
cluster CA; ``node_name``/``node_id_from_name`` convert. Both sides check it:

- the **dialer** sets ``server_hostname=node_name(peer)``, so the ordinary TLS hostname check
  proves it reached the node it meant (a stale address book cannot misdeliver);
- the **acceptor** requires a client certificate (``CERT_REQUIRED``) from the same CA and takes
  the peer's node id from its CN (``peer_node_id``); every message on that connection must come
  ``frm`` that id.

The same certificate serves and dials (``ExtendedKeyUsage`` has both server and client auth).
ECDSA P-256 keys: handshakes cost about a millisecond. TLS 1.3 only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import PeerIdentityError

NODE_NAME_PREFIX = "node-"
_NODE_NAME = re.compile(r"node-([1-9][0-9]{0,18})")  # fits in a u64
_CLOCK_SKEW = datetime.timedelta(minutes=5)


def node_name(node_id: int) -> str:
    """The certificate name (CN and DNS SAN) of a node: ``node-<id>``."""
    if node_id <= 0:
        raise ValueError(f"node ids are positive, got {node_id}")
    return f"{NODE_NAME_PREFIX}{node_id}"


def node_id_from_name(name: str) -> int:
    """Inverse of ``node_name``; raises ``PeerIdentityError`` for anything else."""
    match = _NODE_NAME.fullmatch(name)
    if match is None:
        raise PeerIdentityError(f"certificate name {name!r:.80} is not node-<id>")
    return int(match.group(1))


@dataclass(frozen=True, slots=True)
class CertifiedKey:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


class ClusterCA:
    """A cluster certificate authority that issues node certificates. Tests create their own;
    a real cluster keeps the CA key wherever its security module decides."""

    def __init__(self, certified: CertifiedKey) -> None:
        self.certified = certified

    @classmethod
    def create(
        cls,
        common_name: str = "meshgpu cluster CA",
        *,
        valid_for: datetime.timedelta = datetime.timedelta(days=3650),
    ) -> ClusterCA:
        """A new self-signed CA (path length 0: it signs node certificates only)."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + valid_for)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(CertifiedKey(cert, key))

    def cert_pem(self) -> bytes:
        return self.certified.cert_pem()

    def issue_node_certificate(
        self,
        node_id: int,
        *,
        hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
        valid_for: datetime.timedelta = datetime.timedelta(days=825),
    ) -> CertifiedKey:
        """A certificate for node ``node_id`` (``CN=node-<id>``), usable both to serve and to
        dial. ``hosts`` become extra SANs (IP addresses as IP SANs), for tools that dial by
        address; the transport itself verifies by node name."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.sign_node_key(node_id, key.public_key(), hosts=hosts, valid_for=valid_for)
        return CertifiedKey(cert, key)

    def sign_node_key(
        self,
        node_id: int,
        public_key: ec.EllipticCurvePublicKey,
        *,
        hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
        valid_for: datetime.timedelta = datetime.timedelta(days=825),
    ) -> x509.Certificate:
        """A node certificate for a key the node generated itself (from its CSR): the private
        key never leaves the node."""
        name = node_name(node_id)
        sans: list[x509.GeneralName] = [x509.DNSName(name)]
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        ca_cert, ca_key = self.certified.cert, self.certified.key
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + valid_for)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        return cert


@dataclass(frozen=True, slots=True)
class NodeTLSFiles:
    """Where one node's PEM files live (``ssl`` loads certificates and keys from files only)."""

    ca_cert: Path
    cert: Path
    key: Path


def write_node_files(
    directory: str | os.PathLike[str], ca_cert_pem: bytes, node: CertifiedKey
) -> NodeTLSFiles:
    """Write ``ca.crt``, ``node.crt`` and ``node.key`` (mode 0600) into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = NodeTLSFiles(d / "ca.crt", d / "node.crt", d / "node.key")
    files.ca_cert.write_bytes(ca_cert_pem)
    files.cert.write_bytes(node.cert_pem())
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(node.key_pem())
    return files


def _base_context(protocol: int, files: NodeTLSFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Trust only the cluster CA, never the system store: any public certificate would
    # otherwise be a valid "peer".
    ctx.load_verify_locations(cafile=str(files.ca_cert))
    ctx.load_cert_chain(certfile=str(files.cert), keyfile=str(files.key))
    return ctx


def server_context(files: NodeTLSFiles) -> ssl.SSLContext:
    """Context for accepted connections: presents this node's certificate and requires one
    from the peer, signed by the cluster CA."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, files)
    # Connections are long-lived and never resumed; tickets would only be bytes the dialer has
    # to read before it notices anything else.
    ctx.num_tickets = 0
    return ctx


def client_context(files: NodeTLSFiles) -> ssl.SSLContext:
    """Context for dialing a peer: presents this node's certificate and checks that the peer's
    is from the cluster CA and names the node dialed (``server_hostname=node_name(peer)``)."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, files)
    ctx.check_hostname = True
    return ctx


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """The two contexts a transport needs."""

    server: ssl.SSLContext
    client: ssl.SSLContext

    @classmethod
    def from_files(cls, files: NodeTLSFiles) -> TLSConfig:
        return cls(server=server_context(files), client=client_context(files))


def peer_node_id(stream: trio.SSLStream[trio.abc.Stream]) -> int:
    """The node id that the (already verified) peer certificate of ``stream`` names.

    Call after the handshake. The CN is authoritative; a ``node-<id>`` DNS SAN that names a
    different node makes the certificate ambiguous and is refused."""
    cert = stream.getpeercert()
    if not cert:
        raise PeerIdentityError("peer presented no certificate")
    common_names = [
        value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"
    ]
    if len(common_names) != 1:
        raise PeerIdentityError(f"peer certificate has {len(common_names)} common names")
    node_id = node_id_from_name(common_names[0])
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS" and value.startswith(NODE_NAME_PREFIX) and value != common_names[0]:
            raise PeerIdentityError(
                f"peer certificate names {common_names[0]!r} and {value!r}: ambiguous"
            )
    return node_id
