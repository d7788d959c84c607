"""L2 norm clipping, written once: every clip in insitu (robust, central DP, SecAgg inputs, distributed
DP) goes through :func:`clip_in_place`, and :class:`Clip` is its pipeline stage (Sun et al. 2019).

    >>> clip_by_norm(np.array([3.0, 4.0], np.float32), 1.0)
    array([0.6, 0.8], dtype=float32)
"""

from __future__ import annotations

import math

import numpy as np

from insitu.aggregation.base import Properties, Report

_CHUNK_VALUES = 1 << 20  # values per float64 block when taking a norm


def l2_norm(vector: np.ndarray) -> float:
    """L2 norm accumulated in float64 blocks: no float32 overflow for huge (attacker) values.

    NaN or inf anywhere gives a non-finite result; a finite result means every value is finite.
    """
    flat = np.ravel(vector)
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, flat.size, _CHUNK_VALUES):
            block = flat[start : start + _CHUNK_VALUES].astype(np.float64)
            total += float(np.dot(block, block))
    return math.sqrt(total)


def check_max_norm(max_norm: float) -> float:
    """``max_norm`` as a float, or a ValueError: it must be finite and > 0."""
    if isinstance(max_norm, bool) or not 0 < max_norm < math.inf:
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    return float(max_norm)


def clip_in_place(vector: np.ndarray, max_norm: float) -> bool:
    """Scale ``vector`` (float32 or float64, writable) down to L2 norm <= ``max_norm``; True if it was
    already within. Non-finite vectors are left as they are (and count as not within): screen them."""
    norm = l2_norm(vector)
    if norm <= max_norm:
        return True
    if math.isfinite(norm):
        vector *= vector.dtype.type(max_norm / norm)
        # float32 rounding can leave the norm up to ~2 ulp above the bound; 4 ulp down is enough
        if l2_norm(vector) > max_norm:
            vector *= vector.dtype.type(1.0 - 2.0**-22)
    return False


def clip_by_norm(vector: np.ndarray, max_norm: float) -> np.ndarray:
    """A new float32 copy of ``vector`` scaled down to L2 norm <= ``max_norm`` (unchanged if below)."""
    out = np.array(vector, dtype=np.float32, copy=True)
    clip_in_place(out, check_max_norm(max_norm))
    return out


class Clip:
    """Pre-stage: each update scaled to L2 norm <= max_norm; reports how many were already within."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = check_max_norm(max_norm)
        self.properties = Properties(sensitivity=self.max_norm, metrics=("within_clip",))

    def apply(self, update: np.ndarray) -> tuple[np.ndarray, Report]:
        """The clipped update (in place when ``update`` is writable float32, else a copy)."""
        if update.dtype != np.float32 or not update.flags.writeable:
            update = np.array(update, dtype=np.float32)  # never write through someone's read-only view
        return update, {"within_clip": int(clip_in_place(update, self.max_norm))}

    def __repr__(self) -> str:
        return f"clip({self.max_norm})"


def clip(max_norm: float) -> Clip:
    """Clip every update to L2 norm <= ``max_norm``: bounds one client's pull (and DP's sensitivity)."""
    return Clip(max_norm)
