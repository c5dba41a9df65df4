"""Project secrets at rest: AES-256-GCM under the cluster data key, the project and name as
associated data (a ciphertext moved to another project or name does not open), a fresh 12-byte
nonce per value. The data key (32 random bytes) is sealed to the cluster CA's public key
(``pki.seal``) so that only the voters, who hold the CA key, can open it.

API tokens of users: ``mgu1_<token id>_<secret>``; the state keeps ``verifier`` (SHA-256).
"""

from __future__ import annotations

import hashlib
import os
import secrets as _random
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAX_SECRET_BYTES = 64 << 10
USER_TOKEN_PREFIX = "mgu1"


def new_data_key() -> tuple[str, bytes]:
    """A new key id and data key."""
    return _random.token_hex(4), AESGCM.generate_key(bit_length=256)


def _aad(project: str, name: str) -> bytes:
    return b"meshgpu-secret-v1\0" + project.encode() + b"\0" + name.encode()


def encrypt(key: bytes, project: str, name: str, value: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, value, _aad(project, name))


def decrypt(key: bytes, project: str, name: str, blob: bytes) -> bytes:
    """The value; ``cryptography.exceptions.InvalidTag`` if it is not this project's and
    name's value under this key."""
    return AESGCM(key).decrypt(blob[:12], blob[12:], _aad(project, name))


@dataclass(frozen=True, slots=True)
class UserToken:
    token_id: str
    secret: str

    def __str__(self) -> str:
        return f"{USER_TOKEN_PREFIX}_{self.token_id}_{self.secret}"

    @classmethod
    def create(cls) -> UserToken:
        return cls(_random.token_hex(4), _random.token_urlsafe(32))

    def verifier(self) -> str:
        return user_token_verifier(str(self))


def user_token_verifier(token: str) -> str:
    return hashlib.sha256(b"meshgpu-user-v1:" + token.encode()).hexdigest()
