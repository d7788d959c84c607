"""Post-stages on the reduced vector: Gaussian noise calibrated to a sensitivity, and a fixed scale.

DP-FedAvg's release is ``pipeline(pre=[clip(C)], reduce=total(), post=[gaussian_noise(z C, C), scale(1 / (q N))])``;
the pipeline refuses noise after a stage whose per-client sensitivity exceeds the one it was
calibrated to (e.g. after a median, or a weighted mean).
"""

from __future__ import annotations

import math

import numpy as np

from insitu.aggregation.base import Properties
from insitu.privacy.randomness import Generator, SecureRandom


class GaussianNoise:
    """Adds N(0, std^2) to every coordinate; ``std`` was calibrated to L2 sensitivity ``sensitivity``.

    ``rng`` draws the noise: OS entropy through ChaCha20 by default; a seeded numpy Generator only for
    reproducible simulations (not private against anyone who knows the seed).
    """

    def __init__(self, std: float, sensitivity: float, rng: Generator | None = None) -> None:
        if not (std >= 0 and math.isfinite(std)) or not (sensitivity > 0 and math.isfinite(sensitivity)):
            raise ValueError(f"noise needs std >= 0 and a finite sensitivity > 0, got std={std}, sensitivity={sensitivity}")
        self.std, self.sensitivity = float(std), float(sensitivity)
        self.rng: Generator = rng if rng is not None else SecureRandom()
        self.properties = Properties(sensitivity=self.sensitivity)

    def output_sensitivity(self, before: float | None, source: str) -> float | None:
        """Refuse to follow ``source`` unless its per-client sensitivity is within the calibration."""
        if before is None or before > self.sensitivity * (1 + 1e-9):
            got = "unbounded" if before is None else f"{before:g}"
            raise ValueError(f"{self!r} is calibrated to a per-client L2 sensitivity of {self.sensitivity:g}, but "
                             f"{source} has sensitivity {got}: noise only protects a clipped sum (e.g. "
                             f"pre=[clip({self.sensitivity:g})], reduce=total()), not a weighted mean or a robust rule")
        return before

    def apply(self, vector: np.ndarray) -> np.ndarray:
        if self.std == 0:
            return vector
        noisy = self.rng.normal(0.0, self.std, size=vector.shape)
        noisy += vector
        vector[...] = noisy  # float64 sum, rounded once into the caller's float32 vector
        return vector

    def __repr__(self) -> str:
        return f"gaussian_noise(std={self.std:g}, sensitivity={self.sensitivity:g})"


class Scale:
    """Multiplies the vector by a fixed public factor (DP's fixed denominator: 1 / (q N))."""

    def __init__(self, factor: float) -> None:
        if not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"scale factor must be finite and > 0, got {factor}")
        self.factor = float(factor)
        self.properties = Properties(linear=True, shift_equivariant=False)

    def output_sensitivity(self, before: float | None, source: str) -> float | None:
        return None if before is None else before * self.factor

    def apply(self, vector: np.ndarray) -> np.ndarray:
        vector *= np.float32(self.factor)
        return vector

    def __repr__(self) -> str:
        return f"scale({self.factor:g})"


def gaussian_noise(std: float, sensitivity: float, rng: Generator | None = None) -> GaussianNoise:
    """N(0, std^2) noise for a release whose per-client L2 sensitivity is at most ``sensitivity``."""
    return GaussianNoise(std, sensitivity, rng)


def scale(factor: float) -> Scale:
    """Multiply the aggregate by ``factor``."""
    return Scale(factor)
