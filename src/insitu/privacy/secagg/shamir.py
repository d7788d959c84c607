"""Shamir t-of-n secret sharing over the prime field GF(2**521 - 1), for 32-byte secrets."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["PRIME", "SHARE_BYTES", "reconstruct", "reconstruct_bytes", "share", "share_bytes"]

PRIME = 2**521 - 1
"""A Mersenne prime larger than any 65-byte secret: a 32-byte secret is one field element."""

SHARE_BYTES = (PRIME.bit_length() + 7) // 8
"""Bytes of one share value, big-endian (66)."""


def share(secret: int, xs: Sequence[int], t: int) -> dict[int, int]:
    """Split ``secret`` so that any t of the returned {x: f(x)} reconstruct it and t-1 reveal nothing."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret must be an integer in [0, PRIME)")
    if not 1 <= t <= len(xs):
        raise ValueError(f"threshold t={t} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct non-zero field elements")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    return {x: _evaluate(coeffs, x) for x in xs}


def _evaluate(coeffs: Sequence[int], x: int) -> int:
    """Horner evaluation of the polynomial with these coefficients (constant first) at x."""
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


@lru_cache(maxsize=64)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange basis coefficients l_i(0) for these points (cached: the server reuses one share set)."""
    coeffs = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        coeffs.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(coeffs)


def reconstruct(points: dict[int, int]) -> int:
    """Lagrange-interpolate f(0) from {x: f(x)}; with fewer than t points the result is unrelated noise."""
    if not points:
        raise ValueError("no shares to reconstruct from")
    xs = tuple(sorted(points))
    return sum(points[x] * c for x, c in zip(xs, _lagrange_at_zero(xs))) % PRIME


def share_bytes(secret: bytes, xs: Sequence[int], t: int) -> dict[int, bytes]:
    """Share a byte string (at most 65 bytes) and return each share as SHARE_BYTES big-endian bytes."""
    if len(secret) >= SHARE_BYTES:
        raise ValueError(f"secret of {len(secret)} bytes is too long for one field element")
    shares = share(int.from_bytes(secret, "big"), xs, t)
    return {x: y.to_bytes(SHARE_BYTES, "big") for x, y in shares.items()}


def reconstruct_bytes(points: dict[int, bytes], length: int) -> bytes:
    """Reconstruct a ``length``-byte secret from SHARE_BYTES-long shares; raise if a share is malformed."""
    values: dict[int, int] = {}
    for x, raw in points.items():
        if not isinstance(raw, bytes) or len(raw) != SHARE_BYTES:
            raise ValueError(f"share at x={x} must be {SHARE_BYTES} bytes")
        value = int.from_bytes(raw, "big")
        if value >= PRIME:
            raise ValueError(f"share at x={x} is not a field element")
        values[x] = value
    secret = reconstruct(values)
    if secret >= 1 << (8 * length):
        raise ValueError(f"reconstructed value does not fit in {length} bytes: inconsistent or too few shares")
    return secret.to_bytes(length, "big")
