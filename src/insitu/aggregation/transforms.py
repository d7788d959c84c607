"""Reducer wrappers that compose (like optax): norm clipping and outlier screening, plus a registry.

``make_reducer("krum", byzantine_f=2, clip_norm=5.0, screen=True)`` builds
``clipped(screened(krum(f=2)), 5.0)``: every update is clipped as it arrives, then the buffered
set is screened, then the survivors are reduced by Krum.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from insitu.aggregation.base import AggregationAssumptionError, EmptyAggregationError, Reducer
from insitu.aggregation.mean import weighted_mean
from insitu.aggregation.robust import (
    bulyan,
    check_count,
    check_update,
    check_weight,
    coordinate_median,
    krum,
    multi_krum,
    trimmed_mean,
)

log = logging.getLogger("insitu")

_CHUNK_VALUES = 1 << 20  # values per float64 block when taking a norm


def min_updates_of(reducer: Reducer) -> int:
    """The fewest updates ``reducer`` accepts; reducers without the notion (the mean) need 1."""
    return int(getattr(reducer, "min_updates", 1))


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


def _check_max_norm(max_norm: float) -> float:
    if isinstance(max_norm, bool) or not 0 < max_norm < math.inf:
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    return float(max_norm)


def clip_by_norm(vector: np.ndarray, max_norm: float) -> np.ndarray:
    """A new float32 copy of ``vector`` scaled down to L2 norm <= ``max_norm`` (unchanged if below).

    Non-finite vectors are returned as (copied) values: clipping cannot repair them; screen them.
    """
    out = np.array(vector, dtype=np.float32, copy=True)
    _clip_in_place(out, _check_max_norm(max_norm))
    return out


def _clip_in_place(vector: np.ndarray, max_norm: float) -> None:
    norm = l2_norm(vector)
    if math.isfinite(norm) and norm > max_norm:
        vector *= np.float32(max_norm / norm)
        # float32 rounding can leave the norm up to ~2 ulp above the bound; 4 ulp down is enough
        if l2_norm(vector) > max_norm:
            vector *= np.float32(1.0 - 2.0**-22)


class Clipped:
    """Scales each update to L2 norm <= max_norm before ``inner`` sees it (Sun et al. 2019).

    Bounds how far any single client can pull the aggregate; the update is clipped in place.
    """

    shift_equivariant = False

    def __init__(self, inner: Reducer, max_norm: float) -> None:
        self.inner = inner
        self.max_norm = _check_max_norm(max_norm)
        self.streaming = inner.streaming

    @property
    def min_updates(self) -> int:
        return min_updates_of(self.inner)

    def start(self, dim: int) -> Any:
        return self.inner.start(dim)

    def add(self, acc: Any, update: np.ndarray, weight: float) -> Any:
        if update.dtype != np.float32 or not update.flags.writeable:
            update = np.array(update, dtype=np.float32)  # never write through someone's read-only view
        _clip_in_place(update, self.max_norm)
        return self.inner.add(acc, update, weight)

    def finish(self, acc: Any) -> np.ndarray:
        return self.inner.finish(acc)

    def __repr__(self) -> str:
        return f"clipped({self.inner!r}, max_norm={self.max_norm})"


@dataclass
class ScreenBuffer:
    """Buffered (update, weight) pairs of one round, screened at ``finish``."""

    dim: int
    updates: list[np.ndarray] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def screen_norms(norms: np.ndarray, max_norm_ratio: float) -> tuple[np.ndarray, float]:
    """Mask of updates kept (finite, norm <= ratio x median finite norm) and the limit used."""
    finite = np.isfinite(norms)
    limit = max_norm_ratio * float(np.median(norms[finite])) if finite.any() else math.inf
    return finite & (norms <= limit), limit


class Screened:
    """Drops non-finite updates and those with norm > max_norm_ratio x the median norm, then
    hands the survivors (with their weights) to ``inner``. ``last_rejected`` lists dropped positions.
    """

    streaming = False
    shift_equivariant = False

    def __init__(self, inner: Reducer, max_norm_ratio: float = 10.0) -> None:
        if isinstance(max_norm_ratio, bool) or not 1.0 <= max_norm_ratio < math.inf:
            raise ValueError(
                f"max_norm_ratio must be finite and >= 1 (below 1 it rejects ordinary updates), got {max_norm_ratio!r}"
            )
        self.inner = inner
        self.max_norm_ratio = float(max_norm_ratio)
        self.last_rejected: list[int] = []

    @property
    def min_updates(self) -> int:
        return min_updates_of(self.inner)

    def start(self, dim: int) -> ScreenBuffer:
        return ScreenBuffer(check_count("dim", dim))

    def add(self, acc: ScreenBuffer, update: np.ndarray, weight: float) -> ScreenBuffer:
        check_weight(weight)
        acc.updates.append(check_update(update, acc.dim))
        acc.weights.append(float(weight))
        return acc

    def finish(self, acc: ScreenBuffer) -> np.ndarray:
        n = len(acc.updates)
        if n == 0:
            raise EmptyAggregationError(f"no updates to aggregate with {self!r}")
        norms = np.array([l2_norm(u) for u in acc.updates])
        keep, limit = screen_norms(norms, self.max_norm_ratio)
        self.last_rejected = [int(i) for i in np.flatnonzero(~keep)]
        for i in self.last_rejected:
            reason = "non-finite values" if not math.isfinite(norms[i]) else f"norm above limit {limit:.4g}"
            log.warning("screened: rejected update %d of %d (norm %.4g): %s", i, n, norms[i], reason)
        return self._reduce_survivors(acc, keep)

    def _reduce_survivors(self, acc: ScreenBuffer, keep: np.ndarray) -> np.ndarray:
        """Feed the kept updates to ``inner``; name the screening in any count error it raises."""
        n, kept = len(acc.updates), int(keep.sum())
        if kept == 0:
            raise EmptyAggregationError(f"screening rejected all {n} updates (see the warnings above)")
        inner_acc = self.inner.start(acc.dim)
        for update, weight, ok in zip(acc.updates, acc.weights, keep):
            if ok:
                inner_acc = self.inner.add(inner_acc, update, weight)
        acc.updates.clear()
        try:
            return self.inner.finish(inner_acc)
        except AggregationAssumptionError as exc:
            raise AggregationAssumptionError(f"after screening rejected {n - kept} of {n} updates: {exc}") from exc

    def __repr__(self) -> str:
        return f"screened({self.inner!r}, max_norm_ratio={self.max_norm_ratio})"


def clipped(inner: Reducer, max_norm: float) -> Clipped:
    """Wrap ``inner`` so every update is first clipped to L2 norm <= ``max_norm``."""
    return Clipped(inner, max_norm)


def screened(inner: Reducer, max_norm_ratio: float = 10.0) -> Screened:
    """Wrap ``inner`` so non-finite and oversized (> ratio x median norm) updates are dropped."""
    return Screened(inner, max_norm_ratio)


# -- registry -----------------------------------------------------------------------------------
AGGREGATOR_NAMES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan")


def _base_reducer(name: str, byzantine_f: int, trim_fraction: float) -> Reducer:
    builders = {
        "mean": weighted_mean,
        "median": coordinate_median,
        "trimmed_mean": lambda: trimmed_mean(trim_fraction),
        "krum": lambda: krum(byzantine_f),
        "multi_krum": lambda: multi_krum(byzantine_f),
        "bulyan": lambda: bulyan(byzantine_f),
    }
    if name not in builders:
        raise ValueError(f"unknown aggregator {name!r}; choose one of: {', '.join(AGGREGATOR_NAMES)}")
    return builders[name]()


def make_reducer(
    name: str, *, byzantine_f: int = 0, trim_fraction: float = 0.1, clip_norm: float = 0.0, screen: bool = False
) -> Reducer:
    """The named reducer, optionally screened and then clipped (clipping is outermost, so first).

    ``byzantine_f`` feeds krum/multi_krum/bulyan, ``trim_fraction`` trimmed_mean; ``clip_norm`` 0
    means no clipping. The result has ``min_updates`` (1 for the mean).
    """
    check_count("byzantine_f", byzantine_f)
    if isinstance(clip_norm, bool) or not 0.0 <= clip_norm < math.inf:
        raise ValueError(f"clip_norm must be >= 0 (0 disables clipping), got {clip_norm!r}")
    reducer = _base_reducer(name, byzantine_f, trim_fraction)
    if not hasattr(reducer, "min_updates"):
        reducer.min_updates = 1  # type: ignore[attr-defined]  # instance attribute; class unchanged
    if screen:
        reducer = screened(reducer)
    if clip_norm > 0:
        reducer = clipped(reducer, clip_norm)
    return reducer
