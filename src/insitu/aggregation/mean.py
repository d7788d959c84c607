"""Weighted mean (FedAvg's reducer), folded as a running sum in float64."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from insitu.aggregation.base import EmptyAggregationError


@dataclass
class MeanAccumulator:
    """Running weighted sum and total weight: all FedAvg needs to keep per round."""

    total: np.ndarray
    weight: float = 0.0
    count: int = 0


class WeightedMean:
    """sum_k w_k u_k / sum_k w_k, streamed: memory is O(dim) whatever the number of clients."""

    streaming = True

    def start(self, dim: int) -> MeanAccumulator:
        return MeanAccumulator(np.zeros(dim, dtype=np.float64))

    def add(self, acc: MeanAccumulator, update: np.ndarray, weight: float) -> MeanAccumulator:
        if not weight > 0:
            raise ValueError(f"weights must be > 0, got {weight}")
        if update.shape != acc.total.shape:
            raise ValueError(f"update has shape {update.shape}, accumulator expects {acc.total.shape}")
        acc.total += np.float64(weight) * update
        acc.weight += float(weight)
        acc.count += 1
        return acc

    def finish(self, acc: MeanAccumulator) -> np.ndarray:
        if acc.count == 0:
            raise EmptyAggregationError("no updates to average")
        return (acc.total / acc.weight).astype(np.float32)


def weighted_mean() -> WeightedMean:
    """The example-weighted mean of McMahan et al. (2017)."""
    return WeightedMean()


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
