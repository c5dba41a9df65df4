"""Authenticated encryption of gossip datagrams with the cluster's gossip keys (memberlist's
keyring, ``security.go``).

Every datagram is sealed with AES-256-GCM under the *primary* key and opened with any key of the
ring, so a key can be rotated without a flag day: install the new key as primary (the old one
stays as secondary), and packets sealed by members that have not heard of the change yet still
open. The associated data binds a packet to one cluster (its id, memberlist's "label"): a packet
from another mesh never opens, even if someone reused a key.

Wire format of a sealed datagram::

    version  1 byte    ``VERSION``
    nonce   12 bytes   random (``os.urandom``): 2^-32 collision odds only after 2^32 packets
                       under one key, far beyond what rotation leaves one key to seal
    body     n bytes   AES-GCM ciphertext of the plaintext packet, then its 16-byte tag

A packet that does not open (wrong key, other cluster, truncated, flipped bit, replayed from
another cluster) raises :class:`DecodeError`; the shell drops and counts it. Replays of a
member's own packets within the cluster are not detected (memberlist does not either): the SWIM
rules make a replayed ``Alive``/``Suspect``/``Dead`` with an old incarnation a no-op, and a
replayed ``Ping`` costs one ``Ack``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigError, DecodeError

VERSION = 1
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE
"""Bytes a sealed datagram adds to the plaintext packet."""
_VERSION_BYTE = bytes([VERSION])


def new_key() -> bytes:
    """A fresh random AES-256 key."""
    return AESGCM.generate_key(bit_length=KEY_SIZE * 8)


class Keyring:
    """The keys a member accepts, primary first; ``label`` (the cluster id) is bound into every
    packet as associated data."""

    __slots__ = ("_aad", "_ciphers", "_keys")

    def __init__(self, keys: Iterable[bytes], label: str) -> None:
        keys = list(dict.fromkeys(keys))  # de-duplicated, order kept
        if not keys:
            raise ConfigError("a keyring needs at least one key")
        for key in keys:
            if len(key) != KEY_SIZE:
                raise ConfigError(f"gossip keys are {KEY_SIZE} bytes, got {len(key)}")
        self._keys = tuple(keys)
        self._ciphers = tuple(AESGCM(k) for k in keys)
        self._aad = _VERSION_BYTE + label.encode()

    @property
    def keys(self) -> tuple[bytes, ...]:
        return self._keys

    def seal(self, packet: bytes) -> bytes:
        """``packet`` encrypted and authenticated under the primary key."""
        nonce = os.urandom(NONCE_SIZE)
        return _VERSION_BYTE + nonce + self._ciphers[0].encrypt(nonce, packet, self._aad)

    def open(self, data: bytes) -> bytes:
        """The plaintext packet; :class:`DecodeError` unless some key of the ring sealed it for
        this cluster."""
        if len(data) < OVERHEAD:
            raise DecodeError(f"sealed packet too short ({len(data)} bytes)")
        if data[0] != VERSION:
            raise DecodeError(f"unknown sealed packet version {data[0]}")
        nonce, body = data[1 : 1 + NONCE_SIZE], data[1 + NONCE_SIZE :]
        for cipher in self._ciphers:
            try:
                return cipher.decrypt(nonce, body, self._aad)
            except InvalidTag:
                continue
        raise DecodeError("packet does not authenticate under any gossip key")
