"""``fl.client`` for Flower client code run against insitu: ``NumPyClient``, ``start_numpy_client``,
``start_client`` (see :mod:`insitu.flower.start` for how the client gets its identity and TLS)."""

from __future__ import annotations

from typing import Any

import numpy as np

from insitu.flower.start import start_client, start_numpy_client

__all__ = ["NumPyClient", "start_client", "start_numpy_client"]


class NumPyClient:
    """Base class of Flower-style clients: override ``get_parameters``, ``fit`` and ``evaluate``.

    ``fit(parameters, config)`` returns ``(arrays, num_examples, metrics)`` and ``evaluate`` returns
    ``(loss, num_examples, metrics)``; ``parameters`` is the global model as a list of numpy arrays in
    the server model's ``state_dict`` order, ``config`` the task's settings (``local_epochs``, ``lr``,
    ``batch_size``, ``seed``, ...). insitu checks everything returned (see :mod:`insitu.flower.adapter`).
    """

    def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
        """Flower's client properties; insitu never asks for them, so none by default."""
        return {}

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        """The local model's arrays, in ``state_dict`` order (to be overridden)."""
        raise NotImplementedError(f"{type(self).__name__} must define get_parameters(self, config)")

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train from ``parameters``; return ``(arrays, num_examples, metrics)`` (to be overridden)."""
        raise NotImplementedError(f"{type(self).__name__} must define fit(self, parameters, config)")

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        """Evaluate ``parameters``; return ``(loss, num_examples, metrics)`` (to be overridden)."""
        raise NotImplementedError(f"{type(self).__name__} must define evaluate(self, parameters, config)")

    def to_client(self) -> ClientWrapper:
        """What Flower's ``to_client()`` returns: a wrapper whose ``numpy_client`` is this client (insitu
        unwraps it wherever a Flower client is accepted)."""
        return ClientWrapper(self)


class ClientWrapper:
    """A ``NumPyClient`` wrapped as by Flower's ``to_client()``; the client is ``numpy_client``."""

    def __init__(self, numpy_client: NumPyClient) -> None:
        self.numpy_client = numpy_client
