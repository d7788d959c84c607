"""Protocol messages: frozen dataclasses of ints and bytes only, so any transport can carry them (no pickle)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AdvertiseKeys",
    "EncryptedShare",
    "KeyBroadcast",
    "MaskedInput",
    "RevealedShare",
    "RoutedShares",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "wire_size",
]


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0, client -> server: the two raw X25519 public keys (c: share encryption, s: pairwise masks)."""

    client_id: int
    cipher_public: bytes
    mask_public: bytes


@dataclass(frozen=True)
class KeyBroadcast:
    """Round 0, server -> clients: every accepted client's public keys (U1)."""

    session: int
    keys: tuple[AdvertiseKeys, ...]


@dataclass(frozen=True)
class EncryptedShare:
    """One AES-GCM ciphertext of a share pair, from ``sender`` to ``recipient``."""

    sender: int
    recipient: int
    ciphertext: bytes


@dataclass(frozen=True)
class ShareKeys:
    """Round 1, client -> server: the sender's encrypted share pairs, one per other client in its group."""

    client_id: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class RoutedShares:
    """Round 1, server -> client: the ciphertexts addressed to ``recipient`` by clients in U2."""

    recipient: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class MaskedInput:
    """Round 2, client -> server: y_u as D little-endian uint32 words (4*D bytes)."""

    client_id: int
    masked: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 3, server -> clients: who sent y (U3, reveal self-mask shares) and who dropped (reveal key shares)."""

    session: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class RevealedShare:
    """A decrypted share of ``owner``'s secret (self-mask seed or mask secret key), 66 bytes."""

    owner: int
    share: bytes


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 3, client -> server: seed shares for survivors, key shares for dropped clients, never both."""

    client_id: int
    seed_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]


def wire_size(message: Any) -> int:
    """Bytes of a message under a plain length-prefixed encoding: int 4 B, bytes/tuple 4 B length + items."""
    if isinstance(message, bool) or not isinstance(message, (int, bytes, tuple)) and not dataclasses.is_dataclass(message):
        raise TypeError(f"not a protocol value: {type(message).__name__}")
    if isinstance(message, int):
        return 4
    if isinstance(message, bytes):
        return 4 + len(message)
    if isinstance(message, tuple):
        return 4 + sum(wire_size(item) for item in message)
    return sum(wire_size(getattr(message, f.name)) for f in dataclasses.fields(message))
