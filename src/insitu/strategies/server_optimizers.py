"""Server optimizers: how the aggregated client delta moves the global model.

FedAvg is plain SGD with learning rate 1 on the averaged delta; adaptive variants (FedAdam, FedYogi,
...) plug in through the same ``init``/``update`` pair, in the style of optax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class ServerOptimizer(Protocol):
    """``update(params, delta, state) -> (new_params, new_state)`` over flat float32 vectors.

    ``delta`` is handed over: an optimizer may overwrite it and return it as the new parameters.
    """

    def init(self, params: np.ndarray) -> Any: ...

    def update(self, params: np.ndarray, delta: np.ndarray, state: Any) -> tuple[np.ndarray, Any]: ...


@dataclass(frozen=True)
class ServerSGD:
    """x <- x + lr * delta. With lr = 1 the new model is the clients' (weighted) average."""

    lr: float = 1.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"server learning rate must be > 0, got {self.lr}")

    def init(self, params: np.ndarray) -> None:
        return None

    def update(self, params: np.ndarray, delta: np.ndarray, state: None) -> tuple[np.ndarray, None]:
        """Computed in place in ``delta`` (which the caller hands over), so no extra model copy."""
        if self.lr != 1.0:
            delta *= np.float32(self.lr)
        delta += params
        return delta, state


def sgd(lr: float = 1.0) -> ServerSGD:
    """Server SGD; ``sgd(1.0)`` is FedAvg's model averaging."""
    return ServerSGD(lr)
