"""Byzantine-robust reducers: order statistics and distance-based selection over buffered updates.

Each rule here must see all updates at once (``needs_individual``): they buffer and stack them into
an ``[n, D]`` float32 array at ``finish``. None declares itself shift-equivariant (Krum's Gram-matrix
distances lose precision on whole models), so a strategy feeds them deltas (``client_model - global``).
They are the papers' unweighted rules: example weights are checked (> 0) but do not enter the result,
since a weight is itself attacker-controlled. Selection rules report the indices they chose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np

from insitu.aggregation.base import (
    AggregationAssumptionError,
    EmptyAggregationError,
    Properties,
    Report,
    check_update,
    check_weight,
)
from insitu.aggregation.registry import register

_CHUNK_VALUES = 1 << 22  # values per column block (32 MiB in float64): bounds the temporaries


@dataclass
class UpdateBuffer:
    """The updates of one round and their weights, kept until ``finish``."""

    dim: int
    updates: list[np.ndarray] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


# -- argument checks ----------------------------------------------------------------------------
def check_count(name: str, value: object, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum``, or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def stack_updates(updates: list[np.ndarray], dim: int) -> np.ndarray:
    """Stack into ``[n, D]`` float32, emptying the list as it goes so the peak stays ~one copy."""
    stacked = np.empty((len(updates), dim), dtype=np.float32)
    for i in range(len(updates) - 1, -1, -1):
        stacked[i] = updates.pop()  # each row is released as soon as it is copied
    return stacked


# -- the shared buffering machinery -------------------------------------------------------------
class BufferingReducer:
    """Base for rules that need every update: buffer in ``add``, check counts, reduce in ``finish``.

    A subclass sets ``properties`` (at least ``min_updates``) and writes ``reduce``.
    """

    properties = Properties(needs_individual=True)

    def start(self, dim: int) -> UpdateBuffer:
        return UpdateBuffer(check_count("dim", dim))

    def add(self, acc: UpdateBuffer, update: np.ndarray, weight: float) -> UpdateBuffer:
        check_weight(weight)
        acc.updates.append(check_update(update, acc.dim))
        acc.weights.append(float(weight))
        return acc

    def finish(self, acc: UpdateBuffer) -> tuple[np.ndarray, Report]:
        n = len(acc.updates)
        if n == 0:
            raise EmptyAggregationError(f"no updates to aggregate with {self!r}")
        if n < self.properties.min_updates:
            raise AggregationAssumptionError(self._assumption_message(n))
        return self.reduce(stack_updates(acc.updates, acc.dim), np.asarray(acc.weights))

    def reduce(self, stacked: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, Report]:
        """The aggregate of ``stacked`` ([n, D] float32, owned: may be overwritten) and the report."""
        raise NotImplementedError

    def _assumption_message(self, n: int) -> str:
        return f"{self!r} needs at least {self.properties.min_updates} updates, got {n}: sample more clients"


# -- coordinate-wise rules (Yin et al. 2018) ----------------------------------------------------
class CoordinateMedian(BufferingReducer):
    """Per-coordinate median (mean of the two middle values for even n); unweighted."""

    def reduce(self, stacked: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, Report]:
        return np.median(stacked, axis=0, overwrite_input=True).astype(np.float32, copy=False), {}

    def __repr__(self) -> str:
        return "coordinate_median()"


class TrimmedMean(BufferingReducer):
    """Per coordinate, drop the floor(beta n) largest and smallest values and average the rest."""

    def __init__(self, beta: float) -> None:
        if isinstance(beta, bool) or not isinstance(beta, Real) or not 0.0 <= beta < 0.5:
            raise ValueError(f"trimmed mean needs 0 <= beta < 0.5, got {beta}")
        self.beta: float = float(beta)

    def reduce(self, stacked: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, Report]:
        n = stacked.shape[0]
        k = int(np.floor(self.beta * n))
        if k > 0:  # partition puts ranks k..n-k-1 (unordered) between the two pivots
            stacked.partition([k, n - k - 1], axis=0)
        return stacked[k : n - k].mean(axis=0, dtype=np.float64).astype(np.float32), {}

    def __repr__(self) -> str:
        return f"trimmed_mean(beta={self.beta})"


# -- distance-based selection (Blanchard et al. 2017; El Mhamdi et al. 2018) --------------------
def squared_distances(stacked: np.ndarray) -> np.ndarray:
    """Pairwise squared L2 distances [n, n] via a float64 Gram matrix, built in column blocks.

    Memory is O(n^2) plus one block, never [n, n, D]. Non-finite distances (from NaN/inf
    updates) become +inf, so such updates score worst instead of poisoning the comparison.
    """
    n, dim = stacked.shape
    gram = np.zeros((n, n), dtype=np.float64)
    step = max(1, _CHUNK_VALUES // max(n, 1))
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, dim, step):
            block = stacked[:, start : start + step].astype(np.float64)
            gram += block @ block.T
        gram = 0.5 * (gram + gram.T)  # exactly symmetric, so d(i, j) == d(j, i) bit for bit
        sq_norms = np.diag(gram).copy()
        dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram
    dist[~np.isfinite(dist)] = np.inf
    np.maximum(dist, 0.0, out=dist)  # rounding can make d(i, j) slightly negative
    return dist


def krum_scores(dist: np.ndarray, f: int) -> np.ndarray:
    """score(i) = sum of the n - f - 2 smallest distances from i to the others (clamped at 0)."""
    n = dist.shape[0]
    k = max(n - f - 2, 0)
    if k == 0:
        return np.zeros(n)
    others = dist.copy()
    np.fill_diagonal(others, np.inf)
    return np.sort(others, axis=1)[:, :k].sum(axis=1)


def krum_order(stacked: np.ndarray, f: int) -> np.ndarray:
    """Indices sorted by Krum score, best first; ties go to the lowest index (stable sort)."""
    return np.argsort(krum_scores(squared_distances(stacked), f), kind="stable")


class Krum(BufferingReducer):
    """Krum (Blanchard et al. 2017): the single update closest to its n - f - 2 neighbours.

    Tolerates f Byzantine updates out of n > 2f + 2. Reports ``selected``, the chosen index.
    """

    def __init__(self, f: int) -> None:
        self.f = check_count("f", f)
        self.properties = Properties(needs_individual=True, min_updates=2 * self.f + 3, metrics=("selected",))

    def reduce(self, stacked: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, Report]:
        best = int(krum_order(stacked, self.f)[0])
        return stacked[best].copy(), {"selected": [best]}

    def _assumption_message(self, n: int) -> str:
        return f"{self!r} needs n > 2f + 2 = {2 * self.f + 2} updates, got {n}: lower f or sample more clients"

    def __repr__(self) -> str:
        return f"krum(f={self.f})"


class MultiKrum(Krum):
    """Multi-Krum: the uniform average of the m best-scoring updates (m defaults to n - f)."""

    def __init__(self, f: int, m: int | None = None) -> None:
        super().__init__(f)
        self.m = None if m is None else check_count("m", m, minimum=1)

    def reduce(self, stacked: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, Report]:
        n = stacked.shape[0]
        m = n - self.f if self.m is None else self.m
        if not 1 <= m <= n:
            raise AggregationAssumptionError(
                f"{self!r} averages m = {m} updates but got only n = {n}: lower m or sample more clients"
            )
        chosen = np.sort(krum_order(stacked, self.f)[:m])
        return stacked[chosen].mean(axis=0, dtype=np.float64).astype(np.float32), {"selected": [int(i) for i in chosen]}

    def __repr__(self) -> str:
        return f"multi_krum(f={self.f}, m={self.m})"


def bulyan_select(dist: np.ndarray, f: int, theta: int) -> list[int]:
    """Apply Krum ``theta`` times, each on what remains (scores recomputed), removing each pick.

    Late rounds tie structurally (with one neighbour a closest pair shares its score; with none all
    score 0), so ties go to the smaller total distance to the rest, then to the lowest index:
    the choice then does not hinge on arrival order.
    """
    remaining = list(range(dist.shape[0]))
    chosen: list[int] = []
    for _ in range(theta):
        sub = dist[np.ix_(remaining, remaining)]
        totals = np.sort(sub, axis=1).sum(axis=1)  # summed in sorted order: independent of arrival
        best = int(np.lexsort((totals, krum_scores(sub, f)))[0])  # stable: lowest index last
        chosen.append(remaining.pop(best))
    return chosen


def closest_to_median_mean(selected: np.ndarray, beta: int) -> np.ndarray:
    """Per coordinate, the mean of the ``beta`` values closest to that coordinate's median."""
    rows, dim = selected.shape
    out = np.empty(dim, dtype=np.float32)
    step = max(1, _CHUNK_VALUES // (4 * rows))
    for start in range(0, dim, step):
        block = selected[:, start : start + step]
        deviation = np.abs(block - np.median(block, axis=0))
        nearest = np.argsort(deviation, axis=0, kind="stable")[:beta]
        out[start : start + step] = np.take_along_axis(block, nearest, axis=0).mean(axis=0, dtype=np.float64)
    return out


class Bulyan(BufferingReducer):
    """Bulyan (El Mhamdi et al. 2018): Krum-select theta = n - 2f updates, then per coordinate
    average the beta = theta - 2f values nearest the median. Needs n >= 4f + 3. Reports ``selected``."""

    def __init__(self, f: int) -> None:
        self.f = check_count("f", f)
        self.properties = Properties(needs_individual=True, min_updates=4 * self.f + 3, metrics=("selected",))

    def reduce(self, stacked: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, Report]:
        theta = stacked.shape[0] - 2 * self.f
        selected = bulyan_select(squared_distances(stacked), self.f, theta)
        return closest_to_median_mean(stacked[selected], theta - 2 * self.f), {"selected": selected}

    def _assumption_message(self, n: int) -> str:
        return f"{self!r} needs n >= 4f + 3 = {self.properties.min_updates} updates, got {n}: lower f or sample more clients"

    def __repr__(self) -> str:
        return f"bulyan(f={self.f})"


# -- factories ----------------------------------------------------------------------------------
@register("median")
def coordinate_median() -> CoordinateMedian:
    """Coordinate-wise median (Yin et al. 2018); unweighted."""
    return CoordinateMedian()


@register("trimmed_mean")
def trimmed_mean(beta: float) -> TrimmedMean:
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018), 0 <= beta < 0.5; unweighted."""
    return TrimmedMean(beta)


@register("krum")
def krum(f: int) -> Krum:
    """Krum (Blanchard et al. 2017) tolerating f Byzantine clients; needs n > 2f + 2; unweighted."""
    return Krum(f)


@register("multi_krum")
def multi_krum(f: int, m: int | None = None) -> MultiKrum:
    """Multi-Krum: uniform mean of the m best Krum scores (default n - f); unweighted."""
    return MultiKrum(f, m)


@register("bulyan")
def bulyan(f: int) -> Bulyan:
    """Bulyan (El Mhamdi et al. 2018) tolerating f Byzantine clients; needs n >= 4f + 3; unweighted."""
    return Bulyan(f)
