"""OpenSSH public keys: users' keys read and checked (``POST /api/v1/ssh/keys``), and a host's
SSH key made once in its data dir. Plain functions over ``cryptography``; no I/O but the host
key's file."""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from meshgpu.datadir import write_private

# What a user may register: what OpenSSH 9 offers by default, less DSA (OpenSSH dropped it).
KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
)
MIN_RSA_BITS = 2048
MAX_KEY_TEXT = 16 << 10  # an RSA-16384 key is ~2.8 KB: anything larger is not a key


class BadPublicKey(ValueError):
    """A public key that cannot be registered; the message says why."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    algorithm: str
    blob: bytes  # the key in SSH wire form
    comment: str

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` as ``ssh-keygen -lf`` prints it."""
        return fingerprint_of(self.blob)

    @property
    def openssh(self) -> str:
        """``<algorithm> <base64>``: the canonical text (no comment)."""
        return f"{self.algorithm} {base64.b64encode(self.blob).decode()}"


def fingerprint_of(blob: bytes) -> str:
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def parse_public_key(text: str) -> PublicKey:
    """One OpenSSH public key line (``ssh-ed25519 AAAA... comment``), checked: the type is one
    we accept, the base64 decodes, the blob names the same type, and the key loads (an RSA key
    of at least ``MIN_RSA_BITS``). Raises ``BadPublicKey`` with the reason."""
    if len(text) > MAX_KEY_TEXT:
        raise BadPublicKey(f"too long for a public key ({len(text)} characters)")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        raise BadPublicKey(
            "empty: expected one OpenSSH public key line, e.g. 'ssh-ed25519 AAAA...'"
        )
    if len(lines) > 1:
        raise BadPublicKey("expected one public key, got several lines")
    if lines[0].startswith("-----BEGIN"):
        raise BadPublicKey("that is a PEM block (a private key?): send the .pub file's line")
    parts = lines[0].split(None, 2)
    if len(parts) < 2:
        raise BadPublicKey("expected '<type> <base64> [comment]'")
    algorithm, b64 = parts[0], parts[1]
    comment = parts[2] if len(parts) > 2 else ""
    if algorithm not in KEY_TYPES:
        raise BadPublicKey(
            f"key type {algorithm!r} is not accepted (one of: {', '.join(KEY_TYPES)})"
        )
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise BadPublicKey("the key's base64 does not decode") from None
    if len(blob) < 4:
        raise BadPublicKey("the key's data is truncated")
    (n,) = struct.unpack(">I", blob[:4])
    if blob[4 : 4 + n] != algorithm.encode():
        raise BadPublicKey(f"the key's data is not a {algorithm} key")
    try:
        key = load_ssh_public_key(f"{algorithm} {b64}".encode())
    except (ValueError, TypeError) as e:
        raise BadPublicKey(f"not a valid {algorithm} key: {e}") from None
    size = getattr(key, "key_size", None)
    if algorithm == "ssh-rsa" and size is not None and size < MIN_RSA_BITS:
        raise BadPublicKey(f"RSA key of {size} bits: at least {MIN_RSA_BITS} are required")
    return PublicKey(algorithm, blob, comment)


def load_or_create_host_key(path: Path) -> tuple[bytes, str]:
    """This host's SSH host key: made once (Ed25519, OpenSSH format, mode 0600) and kept.
    Returns the private key file's bytes and the public key line."""
    if path.exists():
        data = path.read_bytes()
        key = serialization.load_ssh_private_key(data, password=None)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        write_private(path, data)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return data, public.decode()
