"""Key agreement (X25519 + HKDF-SHA256) and authenticated encryption (AES-GCM) of Shamir share pairs."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from insitu.privacy.secagg.shamir import SHARE_BYTES

__all__ = [
    "CIPHERTEXT_BYTES",
    "KEY_BYTES",
    "KeyPair",
    "SharePair",
    "decrypt_shares",
    "derive",
    "encrypt_shares",
    "private_key_from_bytes",
]

KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_PLAINTEXT_BYTES = 2 * SHARE_BYTES
CIPHERTEXT_BYTES = _NONCE_BYTES + _PLAINTEXT_BYTES + _TAG_BYTES
"""Size of one encrypted share pair on the wire: nonce || AES-GCM(share of s_sk || share of b) || tag."""

_LABEL = b"insitu-secagg-v1"


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair; ``public`` is the 32-byte raw public key sent to the server."""

    private: X25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        """Fresh key pair from the OS random source."""
        private = X25519PrivateKey.generate()
        return cls(private, private.public_key().public_bytes_raw())

    def secret_bytes(self) -> bytes:
        """Raw 32-byte private key (what is Shamir-shared for the mask key s)."""
        return self.private.private_bytes_raw()


def private_key_from_bytes(raw: bytes) -> X25519PrivateKey:
    """Rebuild an X25519 private key from its 32 raw bytes (the server, after reconstruction)."""
    return X25519PrivateKey.from_private_bytes(raw)


def derive(private: X25519PrivateKey, peer_public: bytes, purpose: bytes, context: bytes) -> bytes:
    """32-byte key = HKDF-SHA256(X25519(private, peer), info = label || purpose || context)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_LABEL + purpose + context)
    return hkdf.derive(shared)


def _aad(session: int, sender: int, recipient: int) -> bytes:
    """Associated data binding a ciphertext to its session and (sender, recipient) pair."""
    return _LABEL + struct.pack(">QII", session, sender, recipient)


@dataclass(frozen=True)
class SharePair:
    """What client u gives client v: v's share of u's mask secret key and of u's self-mask seed."""

    key_share: bytes
    seed_share: bytes


def encrypt_shares(key: bytes, session: int, sender: int, recipient: int, pair: SharePair) -> bytes:
    """AES-GCM encrypt a share pair under a pairwise key, bound to (session, sender, recipient)."""
    if len(pair.key_share) != SHARE_BYTES or len(pair.seed_share) != SHARE_BYTES:
        raise ValueError(f"shares must be {SHARE_BYTES} bytes each")
    nonce = os.urandom(_NONCE_BYTES)
    body = AESGCM(key).encrypt(nonce, pair.key_share + pair.seed_share, _aad(session, sender, recipient))
    return nonce + body


def decrypt_shares(key: bytes, session: int, sender: int, recipient: int, ciphertext: bytes) -> SharePair:
    """Decrypt and authenticate a share pair; raise ValueError if it was tampered with or misrouted."""
    if not isinstance(ciphertext, bytes) or len(ciphertext) != CIPHERTEXT_BYTES:
        raise ValueError(f"encrypted share must be {CIPHERTEXT_BYTES} bytes")
    nonce, body = ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:]
    try:
        plain = AESGCM(key).decrypt(nonce, body, _aad(session, sender, recipient))
    except InvalidTag as exc:
        raise ValueError(f"encrypted share from client {sender} to {recipient} failed authentication") from exc
    return SharePair(plain[:SHARE_BYTES], plain[SHARE_BYTES:])
