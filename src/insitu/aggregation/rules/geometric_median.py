"""Geometric median by smoothed Weiszfeld: RFA (Pillutla, Kakade and Harchaoui 2022, Algorithm 2).

Minimises sum_k a_k max(nu, ||z - u_k||) over z, with a_k the normalised example weights; its
breakdown point is 1/2 (of the total weight), so a minority of arbitrary updates moves it boundedly.
"""

from __future__ import annotations

import numpy as np

from insitu.aggregation.base import Properties, Report
from insitu.aggregation.registry import register
from insitu.aggregation.robust import BufferingReducer, check_count


class GeometricMedian(BufferingReducer):
    """z <- sum_k b_k u_k / sum_k b_k with b_k = a_k / max(nu, ||z - u_k||), from the weighted mean,
    until a step moves z by at most ``tol`` x the median distance to the updates, or for ``max_iter``
    steps; reports the steps taken."""

    def __init__(self, max_iter: int = 100, tol: float = 1e-6, nu: float = 1e-6) -> None:
        self.max_iter = check_count("max_iter", max_iter, minimum=1)
        if not (tol > 0 and nu > 0):
            raise ValueError(f"geometric median needs tol > 0 and smoothing nu > 0, got tol={tol}, nu={nu}")
        self.tol, self.nu = float(tol), float(nu)
        self.properties = Properties(needs_individual=True, uses_weights=True, metrics=("iterations",))

    def reduce(self, stacked: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, Report]:
        points, alphas = stacked.astype(np.float64), weights / weights.sum()
        z = alphas @ points
        for step in range(1, self.max_iter + 1):
            gaps = np.maximum(self.nu, np.array([np.linalg.norm(p - z) for p in points]))
            betas = alphas / gaps
            z, previous = betas @ points / betas.sum(), z
            # a step small against the median distance: scale-free, and outliers do not loosen it
            if np.linalg.norm(z - previous) <= self.tol * float(np.median(gaps)):
                break
        return z.astype(np.float32), {"iterations": step}

    def __repr__(self) -> str:
        return f"geometric_median(max_iter={self.max_iter}, tol={self.tol}, nu={self.nu})"


@register("geometric_median")
def geometric_median(max_iter: int = 100, tol: float = 1e-6, nu: float = 1e-6) -> GeometricMedian:
    """RFA's robust aggregate: the example-weighted geometric median (smoothed Weiszfeld)."""
    return GeometricMedian(max_iter, tol, nu)
