"""The reducer contract: fold client updates one at a time, then finish.

Every reducer is fed updates as they arrive (``add``) so the round loop never needs to hold all of
them. Linear reducers (``streaming = True``) keep O(model) memory; order-statistic reducers such as
the median must buffer and say so with ``streaming = False``.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class EmptyAggregationError(ValueError):
    """``finish`` was called before any update was added."""


class AggregationAssumptionError(ValueError):
    """An aggregator's assumption does not hold (e.g. too few updates for the tolerated attackers).

    The message names the limit broken and the fix, so a misconfigured run fails with advice.
    """


class Reducer(Protocol):
    """Turns a stream of (update vector, weight) pairs into one vector."""

    streaming: bool

    def start(self, dim: int) -> Any:
        """A fresh accumulator for vectors of length ``dim``."""

    def add(self, acc: Any, update: np.ndarray, weight: float) -> Any:
        """Fold one update (float32, length ``dim``) with a positive weight into ``acc``.

        A streaming reducer must not keep ``update`` past the call (it may view memory that is
        reused); a buffering one (``streaming = False``) is handed its own copy.
        """

    def finish(self, acc: Any) -> np.ndarray:
        """The aggregate (float32, length ``dim``), a new array the caller owns; ``acc`` is spent."""
