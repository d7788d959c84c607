"""insitu's one fixed-point codec, and its one ``[w x, w]`` encoder.

A float x is clipped to [-B, B] and quantized to the integer ``round(x * scale)`` (:meth:`FixedPoint.quantize`),
so every quantized value lies in [-C, C] with ``C = round(B * scale)``; :meth:`FixedPoint.dequantize`
divides by ``scale``. Each value is off by at most ``1 / (2 * scale)`` (:attr:`FixedPoint.resolution`), a
sum of ``k`` quantized values by at most ``k / (2 * scale)``.

Secure aggregation sums in Z_R with R = 2**32 (:data:`MODULUS`): :func:`to_field` reads integers mod R
(as uint32) and :func:`from_field` reads a sum back as a two's-complement 32-bit integer, which is exact
while the true sum lies in [-(R/2 - 1), R/2 - 1]. :meth:`FixedPoint.for_sum` picks the largest scale at
which n summands clipped to [-B, B] always do: ``scale = floor((R/2 - 1) / (n * B))``, lowered by one in
the rare case where rounding at +-B would push ``n * round(B * scale)`` past R/2 - 1. Distributed DP's
integer inputs (rounded by the Skellam mechanism, which must round at random) enter the same field through
:func:`to_field` and leave it through :func:`from_field`. Paillier aggregation (:mod:`insitu.contrib.he`)
uses the same quantization with its own scale.

:func:`with_weight` builds FedAvg's ``[w x, w]`` input, so that one sum yields both the numerator and the
denominator of the weighted mean (:func:`split_weighted`); secure aggregation and Paillier both use it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["MODULUS", "FixedPoint", "from_field", "split_weighted", "to_field", "with_weight"]

MODULUS = 2**32
"""R: every masked value and mask is an element of Z_R, stored as uint32 (numpy wraps mod 2**32)."""

_HALF = MODULUS // 2
MAX_INT = 2**52
"""Largest quantized magnitude C: int64 and float64 arithmetic on it stay exact."""
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
    """Values clipped to [-bound, bound], quantized at ``scale``; a sum may hold up to ``summands`` of them.

    >>> codec = FixedPoint(scale=4, bound=1.0)
    >>> codec.quantize(np.array([0.3, -2.0]))[0].tolist(), codec.dequantize(np.array([1, -4])).tolist()
    ([1, -4], [0.25, -1.0])
    """

    scale: int
    bound: float
    summands: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.scale, int) or isinstance(self.scale, bool):
            raise TypeError(f"scale must be an int, got {self.scale!r}")
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        if isinstance(self.bound, bool) or not isinstance(self.bound, (int, float)):
            raise TypeError(f"bound must be a number, got {self.bound!r}")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"clipping bound must be a positive finite number, got {self.bound}")
        if self.summands < 1:
            raise ValueError(f"need at least one summand, got {self.summands}")
        if not 1 <= self.max_int <= MAX_INT:
            raise ValueError(f"round(bound * scale) must be in [1, 2**52] for exact arithmetic, got {self.max_int}: "
                             "lower the scale or the bound")

    @classmethod
    def for_sum(cls, n: int, bound: float) -> FixedPoint:
        """The finest codec whose sum of ``n`` inputs in [-bound, bound] never wraps around Z_(2**32)."""
        if n < 1:
            raise ValueError(f"need at least one client, got n={n}")
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"clipping bound must be a positive finite number, got {bound}")
        return cls(_scale_for(n, float(bound)), float(bound), n)

    @property
    def max_int(self) -> int:
        """C = round(bound * scale): the largest quantized magnitude."""
        return round(float(self.bound) * self.scale)

    @property
    def resolution(self) -> float:
        """Largest rounding error of one quantized value: 1 / (2 * scale)."""
        return 0.5 / self.scale

    @property
    def max_abs_error(self) -> float:
        """Largest error per element of a decoded sum of ``summands`` inputs: summands / (2 * scale)."""
        return self.summands * self.resolution

    def quantize(self, x: npt.ArrayLike) -> tuple[np.ndarray, int]:
        """Clip to [-bound, bound] and round to int64 in [-C, C]; return (ints, how many values were clipped).

        NaN and infinity are refused: they have no fixed-point value."""
        x = np.asarray(x, dtype=np.float64).ravel()
        if not np.all(np.isfinite(x)):
            raise ValueError("input contains NaN or infinity; fixed-point encoding needs finite values")
        clipped = np.clip(x, -self.bound, self.bound)
        n_clipped = int(np.count_nonzero(clipped != x))
        ints = np.rint(clipped * self.scale).astype(np.int64)
        c = self.max_int
        return np.clip(ints, -c, c, out=ints), n_clipped

    def dequantize(self, ints: np.ndarray | Iterable[int]) -> np.ndarray:
        """(Summed) quantized integers back to float64. Python ints beyond int64 are divided exactly."""
        if isinstance(ints, np.ndarray):
            out = ints.astype(np.float64)
            out /= self.scale  # in place: one float64 copy of a possibly model-sized vector
            return out
        return np.array([i / self.scale for i in ints], dtype=np.float64)

    def encode(self, x: npt.ArrayLike) -> tuple[np.ndarray, int]:
        """Quantize into Z_(2**32) (uint32); return (encoded, number of clipped elements)."""
        ints, n_clipped = self.quantize(x)
        if n_clipped:
            logger.info("fixed point: clipped %d of %d elements to [-%g, %g]", n_clipped, ints.size, self.bound,
                        self.bound)
        return to_field(ints), n_clipped

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        """Decode a mod-2**32 sum of at most ``summands`` encoded vectors to float64."""
        out = from_field(total, np.float64)
        out /= self.scale  # in place: one float64 copy of a possibly model-sized vector
        return out

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        """Decode a single encoded vector (the sum of one input)."""
        return self.decode_sum(encoded)


def to_field(ints: npt.ArrayLike) -> np.ndarray:
    """Integers as elements of Z_(2**32) (uint32): int64 -> uint32 keeps the low 32 bits, i.e. x mod 2**32."""
    array = np.asarray(ints)
    if array.dtype.kind not in "iu":
        raise ValueError(f"only integers enter the field, got dtype {array.dtype}")
    return array.astype(np.int64).astype(np.uint32)


def from_field(total: np.ndarray, dtype: npt.DTypeLike = np.int64) -> np.ndarray:
    """A mod-2**32 sum read as a two's-complement 32-bit integer (as ``dtype``): exact while |sum| < 2**31."""
    total = np.asarray(total)
    if total.dtype != np.uint32:
        raise ValueError(f"expected a uint32 vector mod 2**32, got dtype {total.dtype}")
    return total.view(np.int32).astype(dtype)


def with_weight(x: npt.ArrayLike, weight: float) -> np.ndarray:
    """Weighted-FedAvg input: [weight * x, weight] so one sum yields both numerator and denominator."""
    x = np.asarray(x, dtype=np.float64).ravel()
    return np.concatenate([weight * x, [float(weight)]])


def split_weighted(total: np.ndarray, dtype: npt.DTypeLike = np.float64) -> np.ndarray:
    """Weighted mean from a sum of :func:`with_weight` vectors: sum(w*x) / sum(w).

    Divided straight into ``dtype`` (float64 arithmetic), with no model-sized temporary.
    """
    total = np.asarray(total, dtype=np.float64)
    weight = float(total[-1])
    if weight <= 0:
        raise ValueError(f"sum of weights must be positive, got {weight}")
    mean = np.empty(total.size - 1, dtype=dtype)
    np.divide(total[:-1], weight, out=mean, casting="same_kind")
    return mean
