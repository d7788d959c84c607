"""Outlier screening: drop non-finite updates and those far larger than the median norm."""

from __future__ import annotations

import logging
import math

import numpy as np

from insitu.aggregation.base import Properties, Report
from insitu.aggregation.clip import l2_norm

log = logging.getLogger("insitu")


def screen_norms(norms: np.ndarray, max_norm_ratio: float) -> tuple[np.ndarray, float]:
    """Mask of updates kept (finite, norm <= ratio x median finite norm) and the limit used."""
    finite = np.isfinite(norms)
    limit = max_norm_ratio * float(np.median(norms[finite])) if finite.any() else math.inf
    return finite & (norms <= limit), limit


class Screen:
    """Pre-stage over the whole round: keeps finite updates with norm <= max_norm_ratio x the median
    norm. Reports ``rejected``, the positions (among the updates it saw) it dropped, and logs why."""

    def __init__(self, max_norm_ratio: float = 10.0) -> None:
        if isinstance(max_norm_ratio, bool) or not 1.0 <= max_norm_ratio < math.inf:
            raise ValueError(
                f"max_norm_ratio must be finite and >= 1 (below 1 it rejects ordinary updates), got {max_norm_ratio!r}"
            )
        self.max_norm_ratio = float(max_norm_ratio)
        # whether one update is kept depends on the others' norms: no per-client sensitivity survives it
        self.properties = Properties(needs_individual=True, metrics=("rejected",))

    def select(self, updates: list[np.ndarray]) -> tuple[np.ndarray, Report]:
        """The boolean mask of updates kept, and the report."""
        norms = np.array([l2_norm(u) for u in updates])
        keep, limit = screen_norms(norms, self.max_norm_ratio)
        rejected = [int(i) for i in np.flatnonzero(~keep)]
        for i in rejected:
            reason = "non-finite values" if not math.isfinite(norms[i]) else f"norm above limit {limit:.4g}"
            log.warning("screened: rejected update %d of %d (norm %.4g): %s", i, len(updates), norms[i], reason)
        return keep, {"rejected": rejected}

    def __repr__(self) -> str:
        return f"screen({self.max_norm_ratio})"


def screen(max_norm_ratio: float = 10.0) -> Screen:
    """Drop non-finite and oversized (> ratio x median norm) updates before the reduction."""
    return Screen(max_norm_ratio)
