"""insitu.run.validation: the magnitude bound and the checks on results and aggregates (hand-computed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from insitu.client.api import FitResult
from insitu.params import Parameters
from insitu.run.validation import (
    MAGNITUDE_LIMIT,
    check_aggregate,
    check_fit_result,
    magnitude_bound,
)


def params(**arrays):
    return Parameters.from_arrays({k: np.asarray(v) for k, v in arrays.items()})


def test_the_bound_is_the_limit_times_the_largest_global_value_but_at_least_the_limit():
    assert magnitude_bound(params(w=np.zeros(4, np.float32))) == MAGNITUDE_LIMIT  # max(1, 0)
    assert magnitude_bound(params(w=np.array([0.5, -3.0], np.float32), b=np.array([2.0], np.float32))) == 3e6
    assert magnitude_bound(params(w=np.array([1.0, np.inf], np.float32))) == math.inf  # no bound from a broken model


@pytest.mark.parametrize(("value", "reason"), [
    (4.9e6, None), (-4.9e6, None),
    (5.1e6, "array 'b' holds |values| up to 5.1e+06, above the bound of 5e+06"),
    (-5.1e6, "array 'b' holds |values| up to 5.1e+06"),
    (1e38, "above the bound"),
    (np.nan, "array 'b' contains NaN or Inf"),
    (-np.inf, "array 'b' contains NaN or Inf"),
])
def test_an_update_is_checked_against_the_bound_and_the_array_named(value, reason):
    glob = params(w=np.array([5.0, 0.0], np.float32), b=np.zeros(3, np.float32))
    update = params(w=np.array([1.0, 2.0], np.float32), b=np.array([0.0, value, 0.0], np.float32))
    problem = check_fit_result(FitResult(update, 10, {}), glob.specs, magnitude_bound(glob))
    assert problem is None if reason is None else reason in problem


def test_a_nan_in_a_later_block_is_found():
    vector = np.zeros((1 << 20) + 5, np.float32)
    vector[-2] = np.nan  # in the second 1M-value block
    update = params(w=vector)
    assert "contains NaN or Inf" in check_fit_result(FitResult(update, 1, {}), update.specs)


def test_the_aggregate_must_be_finite_even_without_a_bound():
    assert check_aggregate(params(w=np.ones(3, np.float32))) is None
    assert "the aggregate's array 'w' contains NaN or Inf" in check_aggregate(params(w=np.full(3, np.inf, np.float32)))
    assert "above the bound of 10" in check_aggregate(params(w=np.array([0, 11], np.float32)), 10.0)


@pytest.mark.parametrize("value", [3e38, np.inf])
def test_an_absurd_extra_is_rejected_before_it_reaches_the_algorithm_state(value):
    """A finite 3e38 in SCAFFOLD's control-variate delta would overflow the server's c to inf for good."""
    from insitu.algorithms import SCAFFOLD_DELTA_C
    from insitu.run.validation import magnitude_bound, usable_fit_result
    from insitu.strategies import scaffold

    model = Parameters.from_arrays({"w": np.ones(4, np.float32)})
    strategy = scaffold(min_fit_clients=1, min_available_clients=1)
    delta_c = Parameters.from_arrays({"w": np.full(4, value, np.float32)})
    honest = FitResult(model, 3, extras={SCAFFOLD_DELTA_C: Parameters.from_arrays({"w": np.full(4, 0.5, np.float32)})})
    hostile = FitResult(model, 3, extras={SCAFFOLD_DELTA_C: delta_c})
    bound = magnitude_bound(model)
    assert usable_fit_result(strategy, honest, model.specs, bound) is None
    reason = usable_fit_result(strategy, hostile, model.specs, bound)
    assert reason is not None and SCAFFOLD_DELTA_C in reason
