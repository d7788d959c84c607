"""Checks applied to every client result before it may touch the global model, and to the aggregate
before it replaces the global model.

Besides names, shapes, dtypes and finiteness, a value is refused when it is absurdly large: above
``MAGNITUDE_LIMIT`` x max(1, the largest |value| of the current global model). Such an update is
either broken or an attack (finite values of 1e38 overflow a float32 sum into +inf); honest training
moves weights by far less than a factor of a million.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from insitu.client.api import EvalResult, FitResult
from insitu.params import Parameters, ParamSpec, describe_mismatch

if TYPE_CHECKING:
    from insitu.strategies.strategy import Strategy

MAGNITUDE_LIMIT = 1e6


def magnitude_bound(reference: Parameters) -> float:
    """The largest |value| an update (or aggregate) of ``reference``'s model may hold."""
    largest = _largest(reference.flat())
    return MAGNITUDE_LIMIT * max(1.0, largest) if math.isfinite(largest) else math.inf


def check_fit_result(result: object, expected: Sequence[ParamSpec], max_abs: float = math.inf) -> str | None:
    """Why ``result`` must be rejected, in words; None if it is usable.

    ``max_abs``: the largest |value| accepted (see :func:`magnitude_bound`)."""
    if not isinstance(result, FitResult):
        return f"returned {type(result).__name__}, expected FitResult"
    problem = _check_count(result.num_examples)
    if problem:
        return problem
    if not isinstance(result.parameters, Parameters):
        return f"parameters are a {type(result.parameters).__name__}, expected insitu.Parameters"
    problem = describe_mismatch(result.parameters.specs, expected)
    if problem:
        return f"parameters do not match the global model: {problem}"
    return _check_values(result.parameters, max_abs, "")


def usable_fit_result(strategy: Strategy, outcome: object, expected: Sequence[ParamSpec],
                      max_abs: float = math.inf) -> str | None:
    """Why a fit outcome cannot be folded, or None: a failure, a malformed or absurd update
    (:func:`check_fit_result`), one that lacks what the strategy's client algorithm needs, or extras
    (e.g. SCAFFOLD's control-variate delta) holding values above ``max_abs`` (which would poison the
    server's algorithm state for every later round)."""
    if isinstance(outcome, BaseException):
        return f"fit failed: {type(outcome).__name__}: {outcome}"
    reason = check_fit_result(outcome, expected, max_abs)
    if reason is not None or not isinstance(outcome, FitResult):
        return reason
    reason = strategy.check_fit_result(outcome, tuple(expected))  # the extras' names and shapes
    for name, extra in outcome.extras.items():
        reason = reason or _check_values(extra, max_abs, f"extra {name!r}: ")
    return reason


def numeric_metrics(metrics: object) -> dict[str, float]:
    """The numeric (non-bool) entries of a client's metrics, as floats: what the history records."""
    if not isinstance(metrics, dict):
        return {}
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def check_aggregate(parameters: Parameters, max_abs: float = math.inf) -> str | None:
    """Why a round's new global parameters must not be committed (non-finite or absurd); None if fine."""
    return _check_values(parameters, max_abs, "the aggregate's ")


def _check_values(parameters: Parameters, max_abs: float, what: str) -> str | None:
    largest = _largest(parameters.flat())
    if math.isfinite(largest) and largest <= max_abs:
        return None
    for name, array in parameters:  # name the array only on failure
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            return f"{what}array {name!r} contains NaN or Inf"
    for name, array in parameters:
        if array.size and float(np.abs(array).max()) > max_abs:
            return (f"{what}array {name!r} holds |values| up to {float(np.abs(array).max()):.3g}, above the bound of "
                    f"{max_abs:.3g} (validation.MAGNITUDE_LIMIT x the global model's largest |value|)")
    return f"{what}values are not finite or exceed {max_abs:.3g}"


def check_eval_result(result: object) -> str | None:
    """Why an evaluation result must be ignored; None if usable. Zero examples is allowed (no test data)."""
    if not isinstance(result, EvalResult):
        return f"returned {type(result).__name__}, expected EvalResult"
    n = result.num_examples
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        return f"num_examples must be a non-negative integer, got {n!r}"
    if n > 0 and not (isinstance(result.loss, (int, float)) and math.isfinite(result.loss)):
        return f"loss is {result.loss!r}, expected a finite number"
    return None


def _largest(vector: np.ndarray) -> float:
    """max |x| over a vector in one pass of 1M-value blocks (no model-sized mask); NaN if it holds a NaN."""
    largest = 0.0
    for block in _blocks(vector):
        value = _abs_max(block)
        if math.isnan(value):
            return math.nan
        largest = max(largest, value)
    return largest


def _blocks(vector: np.ndarray, block: int = 1 << 20) -> list[np.ndarray]:
    """Views of 1M values: checks need no temporary as large as the model."""
    return [vector[i : i + block] for i in range(0, vector.size, block)]


def _abs_max(block: np.ndarray) -> float:
    """max |x| over a block; NaN when it holds a NaN, inf when it holds an inf."""
    if not block.size:
        return 0.0
    high, low = float(block.max()), float(block.min())
    return math.nan if math.isnan(high) or math.isnan(low) else max(high, -low)


def _check_count(n: object) -> str | None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        return f"num_examples must be an integer, got {n!r}"
    if n <= 0:
        return f"reported num_examples={n}; an update must come from at least one example"
    return None
