"""Aggregation: pure math over client update vectors."""

from insitu.aggregation.base import AggregationAssumptionError, EmptyAggregationError, Reducer
from insitu.aggregation.mean import MeanAccumulator, WeightedMean, weighted_average_metrics, weighted_mean
from insitu.aggregation.robust import (
    Bulyan,
    CoordinateMedian,
    Krum,
    MultiKrum,
    TrimmedMean,
    UpdateBuffer,
    bulyan,
    coordinate_median,
    krum,
    multi_krum,
    trimmed_mean,
)
from insitu.aggregation.transforms import (
    AGGREGATOR_NAMES,
    Clipped,
    Screened,
    clip_by_norm,
    clipped,
    make_reducer,
    min_updates_of,
    screened,
)

__all__ = [
    "AGGREGATOR_NAMES",
    "AggregationAssumptionError",
    "Bulyan",
    "Clipped",
    "CoordinateMedian",
    "EmptyAggregationError",
    "Krum",
    "MeanAccumulator",
    "MultiKrum",
    "Reducer",
    "Screened",
    "TrimmedMean",
    "UpdateBuffer",
    "WeightedMean",
    "bulyan",
    "clip_by_norm",
    "clipped",
    "coordinate_median",
    "krum",
    "make_reducer",
    "min_updates_of",
    "multi_krum",
    "screened",
    "trimmed_mean",
    "weighted_average_metrics",
    "weighted_mean",
]
