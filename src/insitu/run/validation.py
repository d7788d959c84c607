"""Checks applied to every client result before it may touch the global model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from insitu.client.api import EvalResult, FitResult
from insitu.params import Parameters, ParamSpec, describe_mismatch


def check_fit_result(result: object, expected: Sequence[ParamSpec]) -> str | None:
    """Why ``result`` must be rejected, in words; None if it is usable."""
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
    if not _all_finite(result.parameters.flat()):  # one pass; name the array only on failure
        for name, array in result.parameters:
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                return f"array {name!r} contains NaN or Inf"
    return None


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


def _all_finite(vector: np.ndarray, block: int = 1 << 20) -> bool:
    """np.isfinite(vector).all() in blocks, so the check needs no mask as large as the model."""
    return all(np.isfinite(vector[i : i + block]).all() for i in range(0, vector.size, block))


def _check_count(n: object) -> str | None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        return f"num_examples must be an integer, got {n!r}"
    if n <= 0:
        return f"reported num_examples={n}; an update must come from at least one example"
    return None
