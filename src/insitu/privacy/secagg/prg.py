"""Pseudorandom generator: AES-256-CTR keystream of a 32-byte seed, read as little-endian uint32 words.

Deterministic and cryptographic: both ends of a pairwise mask (and the server, after reconstructing
a seed) expand the same seed to the same vector. Each seed is used for exactly one vector, so the
fixed all-zero counter block is safe.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["SEED_BYTES", "expand"]

SEED_BYTES = 32
_ZERO_IV = bytes(16)


def expand(seed: bytes, dim: int) -> np.ndarray:
    """Expand a 32-byte seed into ``dim`` uniform uint32 values (AES-256-CTR on zeros)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
    stream = encryptor.update(bytes(4 * dim)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)
