"""Aggregation: pure math over client update vectors."""

from insitu.aggregation.base import EmptyAggregationError, Reducer
from insitu.aggregation.mean import MeanAccumulator, WeightedMean, weighted_average_metrics, weighted_mean

__all__ = [
    "EmptyAggregationError",
    "MeanAccumulator",
    "Reducer",
    "WeightedMean",
    "weighted_average_metrics",
    "weighted_mean",
]
