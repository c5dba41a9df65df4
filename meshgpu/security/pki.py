"""The cluster's certificate authority and each node's key and certificate on disk.

Where the CA key lives, and why: in the data directory of every *voter*, and nowhere else. The
founding agent creates it; when the membership manager promotes a node to voter, the leader
seals the CA key to that node's public key (ECDH P-256 + HKDF + AES-GCM) and replicates the
sealed blob through Raft, so only that node can open it. Voters already hold the authoritative
state (a compromised voter is a compromised cluster either way); learners -- the many GPU hosts
that only follow the log -- never see the key. Any voter can therefore admit a host, so admission
has no single point of failure, and losing the founder loses nothing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from consensus.transport import ClusterCA, NodeTLSFiles
from consensus.transport.tls import CertifiedKey
from meshgpu.datadir import open_private, private_dir


class PKIError(ValueError):
    """A certificate or key that does not check out."""


def fingerprint(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()[:32]


def _write_private(path: Path, data: bytes) -> None:
    private_dir(path.parent)
    with os.fdopen(open_private(path), "wb") as f:
        f.write(data)


@dataclass
class NodeIdentity:
    """This node's TLS material under ``<data-dir>/tls`` (and the CA key if it is a voter)."""

    directory: Path

    @property
    def files(self) -> NodeTLSFiles:
        d = self.directory
        return NodeTLSFiles(d / "ca.crt", d / "node.crt", d / "node.key")

    @property
    def ca_key_path(self) -> Path:
        return self.directory / "ca.key"

    def exists(self) -> bool:
        f = self.files
        return f.ca_cert.exists() and f.cert.exists() and f.key.exists()

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.files.key.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def ensure_key(self) -> ec.EllipticCurvePrivateKey:
        if self.files.key.exists():
            return self.private_key()
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(
            self.files.key,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        return key

    def csr_pem(self, name: str) -> bytes:
        key = self.ensure_key()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .sign(key, hashes.SHA256())
        )
        return csr.public_bytes(serialization.Encoding.PEM)

    def install(self, ca_pem: bytes, cert_pem: bytes) -> None:
        _write_private(self.files.ca_cert, ca_pem)  # 0600 like all of the data dir
        _write_private(self.files.cert, cert_pem)

    def ca(self) -> ClusterCA | None:
        """The CA, if this node holds its key (voters)."""
        if not self.ca_key_path.exists():
            return None
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(self.files.ca_cert.read_bytes())
        return ClusterCA(CertifiedKey(cert, key))  # type: ignore[arg-type]

    def store_ca_key(self, key_pem: bytes) -> None:
        _write_private(self.ca_key_path, key_pem)


def create_cluster(identity: NodeIdentity, node_id: int, hosts: tuple[str, ...]) -> ClusterCA:
    """The founding agent: a new CA, its key kept here, and this node's certificate."""
    ca = ClusterCA.create("meshgpu cluster CA")
    identity.store_ca_key(
        ca.certified.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key = identity.ensure_key()
    cert = ca.sign_node_key(node_id, key.public_key(), hosts=hosts)
    identity.install(ca.cert_pem(), cert.public_bytes(serialization.Encoding.PEM))
    return ca


def sign_csr(ca: ClusterCA, csr_pem: bytes, node_id: int, hosts: tuple[str, ...]) -> bytes:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise PKIError(f"not a certificate signing request: {e}") from None
    if not csr.is_signature_valid:
        raise PKIError("the CSR's signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PKIError("node keys must be EC P-256")
    return ca.sign_node_key(node_id, key, hosts=hosts).public_bytes(serialization.Encoding.PEM)


def verify_node_cert(ca_pem: bytes, cert_pem: bytes, node_id: int) -> None:
    """The joiner checks what it received: the certificate is the CA's and names it."""
    ca = x509.load_pem_x509_certificate(ca_pem)
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as e:
        raise PKIError(f"the node certificate is not signed by the cluster CA: {e}") from None
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    if cn != f"node-{node_id}":
        raise PKIError(f"the certificate names {cn}, expected node-{node_id}")


# -- sealing the CA key to one voter ----------------------------------------------------------


def seal(data: bytes, recipient_pem: bytes) -> bytes:
    """Encrypt ``data`` so only the holder of the private key behind ``recipient_pem`` (a
    certificate or a CSR) can read it."""
    if b"CERTIFICATE REQUEST" in recipient_pem:
        pub = x509.load_pem_x509_csr(recipient_pem).public_key()
    else:
        pub = x509.load_pem_x509_certificate(recipient_pem).public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise PKIError("can only seal to EC P-256 keys")
    eph = ec.generate_private_key(ec.SECP256R1())
    shared = eph.exchange(ec.ECDH(), pub)
    key = HKDF(hashes.SHA256(), 32, None, b"meshgpu-seal-v1").derive(shared)
    nonce = os.urandom(12)
    eph_pub = eph.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return eph_pub + nonce + AESGCM(key).encrypt(nonce, data, None)


def unseal(blob: bytes, private_key: ec.EllipticCurvePrivateKey) -> bytes:
    eph_pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), blob[:65])
    nonce, ct = blob[65:77], blob[77:]
    shared = private_key.exchange(ec.ECDH(), eph_pub)
    key = HKDF(hashes.SHA256(), 32, None, b"meshgpu-seal-v1").derive(shared)
    return AESGCM(key).decrypt(nonce, ct, None)
