"""Linear reductions: the weighted mean (FedAvg's), folded as a running float32 sum in one fused pass,
and the plain sum that DP-FedAvg noises."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from insitu.aggregation.base import EmptyAggregationError, Properties, Report, check_weight
from insitu.aggregation.registry import register


@dataclass
class MeanAccumulator:
    """Running weighted sum and total weight: all FedAvg needs to keep per round."""

    total: np.ndarray
    weight: float = 0.0
    count: int = 0


class WeightedMean:
    """sum_k w_k u_k / sum_k w_k, streamed: memory is O(dim) whatever the number of clients.

    Shift-equivariant (mean(u + c) = mean(u) + c), so a strategy may feed it client models instead
    of deltas and save a pass per client.
    """

    properties = Properties(linear=True, uses_weights=True, shift_equivariant=True)

    def start(self, dim: int) -> MeanAccumulator:
        return MeanAccumulator(np.zeros(dim, dtype=np.float32))

    def add(self, acc: MeanAccumulator, update: np.ndarray, weight: float) -> MeanAccumulator:
        check_weight(weight)
        if update.shape != acc.total.shape:
            raise ValueError(f"update has shape {update.shape}, accumulator expects {acc.total.shape}")
        torch.from_numpy(acc.total).add_(torch.from_numpy(np.ascontiguousarray(update, np.float32)), alpha=float(weight))
        acc.weight += float(weight)
        acc.count += 1
        return acc

    def finish(self, acc: MeanAccumulator) -> tuple[np.ndarray, Report]:
        if acc.count == 0:
            raise EmptyAggregationError("no updates to average")
        total, acc.total = acc.total, np.empty(0, np.float32)  # spent: divide in place, no copy
        total /= np.float32(acc.weight)
        return total, {}

    def __repr__(self) -> str:
        return "weighted_mean()"


class Total:
    """sum_k u_k in float64, weights ignored (each client counts once, as user-level DP needs).

    The sum of no update is the zero vector (``min_updates = 0``): under DP a round is released
    whoever was sampled. Its per-client sensitivity is that of its inputs (e.g. set by a clip).
    """

    properties = Properties(linear=True, min_updates=0)

    def start(self, dim: int) -> np.ndarray:
        return np.zeros(dim, dtype=np.float64)

    def add(self, acc: np.ndarray, update: np.ndarray, weight: float) -> np.ndarray:
        check_weight(weight)
        if update.shape != acc.shape:
            raise ValueError(f"update has shape {update.shape}, accumulator expects {acc.shape}")
        acc += update
        return acc

    def finish(self, acc: np.ndarray) -> tuple[np.ndarray, Report]:
        return acc.astype(np.float32), {}

    def __repr__(self) -> str:
        return "total()"


@register("mean")
def weighted_mean() -> WeightedMean:
    """The example-weighted mean of McMahan et al. (2017)."""
    return WeightedMean()


def total() -> Total:
    """The unweighted sum of the updates (DP-FedAvg noises it and divides by the expected count)."""
    return Total()


def weighted_average_metrics(entries: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Average each numeric metric over the clients that report it, weighted by example count."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for num_examples, metrics in entries:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
                sums[key] = sums.get(key, 0.0) + num_examples * float(value)
                weights[key] = weights.get(key, 0) + num_examples
    return {k: sums[k] / weights[k] for k in sums if weights[k] > 0}
