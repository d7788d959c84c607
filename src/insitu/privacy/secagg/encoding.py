"""Fixed-point encoding of float vectors into Z_R (R = 2**32) so that sums of n clipped inputs never wrap.

A client's value x is clipped to [-B, B] and encoded as ``round(x * scale) mod R`` with
``scale = floor((R/2 - 1) / (n * B))`` (lowered by one in the rare case where rounding at +-B would
push ``n * round(B * scale)`` past ``R/2 - 1``). The sum of n encoded values therefore lies in
``[-(R/2 - 1), R/2 - 1]`` and is recovered exactly by reading the modular sum as a two's-complement
32-bit integer. Each element's rounding error is at most ``1 / (2 * scale)``, so the decoded *sum*
is within ``n / (2 * scale)`` of the sum of the clipped inputs (:attr:`FixedPoint.max_abs_error`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = ["MODULUS", "FixedPoint", "split_weighted", "with_weight"]

MODULUS = 2**32
"""R: every masked value and mask is an element of Z_R, stored as uint32 (numpy wraps mod 2**32)."""

_HALF = MODULUS // 2
logger = logging.getLogger("insitu")


def _scale_for(n: int, bound: float) -> int:
    """Largest integer scale whose n-fold sum of rounded +-B values stays within R/2 - 1."""
    scale = math.floor((_HALF - 1) / (n * bound))
    while scale > 0 and n * round(bound * scale) > _HALF - 1:
        scale -= 1
    if scale < 1:
        raise ValueError(
            f"clipping bound B={bound} with n={n} clients leaves no fixed-point precision in a 32-bit "
            f"modulus (need n*B < {_HALF - 1}); lower B or rescale the inputs"
        )
    return scale


@dataclass(frozen=True)
class FixedPoint:
    """Encoder/decoder for n clients' values clipped to [-bound, bound]; sums decode without overflow."""

    n: int
    bound: float
    scale: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"need at least one client, got n={self.n}")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"clipping bound must be a positive finite number, got {self.bound}")
        object.__setattr__(self, "scale", _scale_for(self.n, float(self.bound)))

    @property
    def max_abs_error(self) -> float:
        """Largest absolute error per element of a decoded sum of n inputs: n / (2 * scale)."""
        return self.n / (2 * self.scale)

    def clip(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Clip to [-B, B]; return the clipped float64 array and how many elements were changed."""
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError("input contains NaN or infinity; secure aggregation needs finite values")
        clipped = np.clip(x, -self.bound, self.bound)
        return clipped, int(np.count_nonzero(clipped != x))

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Clip and encode x as uint32 elements of Z_R; return (encoded, number of clipped elements)."""
        clipped, n_clipped = self.clip(x)
        if n_clipped:
            logger.info("secagg: clipped %d of %d elements to [-%g, %g]", n_clipped, clipped.size, self.bound, self.bound)
        ints = np.rint(clipped * self.scale).astype(np.int64)
        return ints.astype(np.uint32), n_clipped  # int64 -> uint32 keeps the low 32 bits: mod R

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        """Decode a mod-R sum of at most n encoded vectors (two's complement around R/2) to float64."""
        total = np.asarray(total)
        if total.dtype != np.uint32:
            raise ValueError(f"expected a uint32 vector mod 2**32, got dtype {total.dtype}")
        out = total.view(np.int32).astype(np.float64)
        out /= self.scale  # in place: one float64 copy of a possibly model-sized vector
        return out

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        """Decode a single encoded vector (the sum of one input)."""
        return self.decode_sum(encoded)


def with_weight(x: np.ndarray, weight: float) -> np.ndarray:
    """Weighted-FedAvg input: [weight * x, weight] so one secure sum yields both numerator and denominator."""
    x = np.asarray(x, dtype=np.float64).ravel()
    return np.concatenate([weight * x, [float(weight)]])


def split_weighted(total: np.ndarray, dtype: npt.DTypeLike = np.float64) -> np.ndarray:
    """Weighted mean from a secure sum of :func:`with_weight` vectors: sum(w*x) / sum(w).

    Divided straight into ``dtype`` (float64 arithmetic), with no model-sized temporary.
    """
    total = np.asarray(total, dtype=np.float64)
    weight = float(total[-1])
    if weight <= 0:
        raise ValueError(f"sum of weights must be positive, got {weight}")
    mean = np.empty(total.size - 1, dtype=dtype)
    np.divide(total[:-1], weight, out=mean, casting="same_kind")
    return mean
