"""Aggregation: pure math over client update vectors, composed as one pipeline of declared stages."""

from insitu.aggregation.base import AggregationAssumptionError, EmptyAggregationError, Properties, Reducer, Report
from insitu.aggregation.clip import Clip, clip, clip_by_norm, clip_in_place, l2_norm
from insitu.aggregation.mean import MeanAccumulator, Total, WeightedMean, total, weighted_average_metrics, weighted_mean
from insitu.aggregation.noise import GaussianNoise, Scale, gaussian_noise, scale
from insitu.aggregation.pipeline import Pipeline, clipped, pipeline, screened
from insitu.aggregation.registry import aggregator_names, aggregator_options, make_reducer, register
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
from insitu.aggregation.screen import Screen, screen

AGGREGATOR_NAMES = aggregator_names()  # built-ins and every module of aggregation/rules/

__all__ = [
    "AGGREGATOR_NAMES",
    "AggregationAssumptionError",
    "Bulyan",
    "Clip",
    "CoordinateMedian",
    "EmptyAggregationError",
    "GaussianNoise",
    "Krum",
    "MeanAccumulator",
    "MultiKrum",
    "Pipeline",
    "Properties",
    "Reducer",
    "Report",
    "Scale",
    "Screen",
    "Total",
    "TrimmedMean",
    "UpdateBuffer",
    "WeightedMean",
    "aggregator_names",
    "aggregator_options",
    "bulyan",
    "clip",
    "clip_by_norm",
    "clip_in_place",
    "clipped",
    "coordinate_median",
    "gaussian_noise",
    "krum",
    "l2_norm",
    "make_reducer",
    "multi_krum",
    "pipeline",
    "register",
    "scale",
    "screen",
    "screened",
    "total",
    "trimmed_mean",
    "weighted_average_metrics",
    "weighted_mean",
]
