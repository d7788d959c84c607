"""Protocol messages: frozen dataclasses of ints, floats and bytes only, so any transport can carry them (no pickle)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CLIPPED",
    "NOISED",
    "WEIGHTED",
    "AdvertiseKeys",
    "EncryptedShare",
    "InputRequest",
    "KeyBroadcast",
    "MaskedInput",
    "RevealedShare",
    "RoundSetup",
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


@dataclass(frozen=True)
class RoundSetup:
    """Before round 0, server -> client: the round's public parameters and this client's protocol id.

    ``degree`` 0 means every client is every other's neighbour (no SecAgg+ graph); ``integer`` 1 means
    the inputs are integers already (distributed DP), 0 that they are fixed-point encoded in [-bound, bound]."""

    session: int
    client_id: int
    n: int
    t: int
    dim: int
    bound: float
    degree: int
    integer: int


WEIGHTED, CLIPPED, NOISED = 1, 2, 3
"""The three inputs a client can be asked for: [w s delta, w s] (FedAvg), a clipped delta (central DP),
a clipped, rounded delta with the client's own noise share (distributed DP)."""


@dataclass(frozen=True)
class InputRequest:
    """Round 2, server -> client: the shares routed to it and which input to mask.

    ``kind`` WEIGHTED uses ``weight_scale`` (the public s of the FedAvg weight w s); CLIPPED uses
    ``clip_norm``; NOISED uses ``clip_norm``, ``gamma`` and ``variance`` (this client's Skellam noise
    share). Fields a kind does not use are 0."""

    shares: RoutedShares
    kind: int
    weight_scale: float
    clip_norm: float
    gamma: float
    variance: float


def wire_size(message: Any) -> int:
    """Bytes of a message under a plain length-prefixed encoding: int 4 B, float 8 B, bytes/tuple 4 B length + items."""
    if isinstance(message, bool) or not isinstance(message, (int, float, bytes, tuple)) and not dataclasses.is_dataclass(message):
        raise TypeError(f"not a protocol value: {type(message).__name__}")
    if isinstance(message, int):
        return 4
    if isinstance(message, float):
        return 8
    if isinstance(message, bytes):
        return 4 + len(message)
    if isinstance(message, tuple):
        return 4 + sum(wire_size(item) for item in message)
    return sum(wire_size(getattr(message, f.name)) for f in dataclasses.fields(message))
