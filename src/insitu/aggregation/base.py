"""The stage contract: what every reduction and transform declares, and how a reduction is fed.

A reduction folds client updates one at a time (``start``/``add``) so the round loop never needs to
hold them all, then ``finish`` returns the aggregate and a small report (its declared metrics). What
a stage can be composed with follows from its :class:`Properties`, never from sniffing attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

Report = dict[str, Any]
"""A stage's explicit per-round outputs (e.g. ``{"selected": [2]}``), keyed by its declared metric names."""


class AggregationAssumptionError(ValueError):
    """An aggregator's assumption does not hold (e.g. too few updates for the tolerated attackers).

    The message names the limit broken and the fix, so a misconfigured run fails with advice.
    """


class EmptyAggregationError(AggregationAssumptionError):
    """``finish`` was called before any update was added (the limit case of too few updates)."""


@dataclass(frozen=True)
class Properties:
    """What a stage guarantees and needs; composition is checked against these, where it is built.

    ``linear``: the output is a weighted sum of the inputs with coefficients fixed by the weights, so
    it can run over a secure sum. ``needs_individual``: it must see every update at once (buffers
    O(n x model) memory; a secure sum cannot feed it). ``uses_weights``: example weights enter the
    result (robust rules ignore them: a weight is attacker-controlled). ``shift_equivariant``:
    f(u + c) = f(u) + c, so a strategy may feed client models and subtract the global model once.
    ``min_updates``: the fewest updates for which its assumption holds. ``sensitivity``: the L2 bound
    it guarantees on one client's contribution to its output (set by clipping), None if unbounded.
    ``metrics``: the keys of the report ``finish`` returns. ``hides_inputs``: only the sum is ever
    revealed (secure aggregation), so nothing that needs individual updates may run on the server.
    """

    linear: bool = False
    needs_individual: bool = False
    uses_weights: bool = False
    shift_equivariant: bool = False
    min_updates: int = 1
    sensitivity: float | None = None
    metrics: tuple[str, ...] = ()
    hides_inputs: bool = False


class Reducer(Protocol):
    """Turns a stream of (update vector, weight) pairs into one vector and a report."""

    properties: Properties

    def start(self, dim: int) -> Any:
        """A fresh accumulator for vectors of length ``dim``."""

    def add(self, acc: Any, update: np.ndarray, weight: float) -> Any:
        """Fold one update (float32, length ``dim``) with a positive weight into ``acc``.

        A stage with ``needs_individual = False`` must not keep ``update`` past the call (it may view
        memory that is reused); one that buffers is handed its own copy.
        """

    def finish(self, acc: Any) -> tuple[np.ndarray, Report]:
        """The aggregate (float32, length ``dim``, a new array the caller owns) and the report of the
        declared metrics; ``acc`` is spent."""


def check_weight(weight: float) -> None:
    """Weights must be > 0 even where the rule ignores them: a zero or NaN weight is a caller bug."""
    if not weight > 0:
        raise ValueError(f"weights must be > 0, got {weight}")


def check_update(update: np.ndarray, dim: int) -> np.ndarray:
    """The update as a float32 vector of length ``dim`` (copied only if its dtype differs)."""
    update = np.asarray(update, dtype=np.float32)
    if update.shape != (dim,):
        raise ValueError(f"update has shape {update.shape}, accumulator expects ({dim},)")
    return update
