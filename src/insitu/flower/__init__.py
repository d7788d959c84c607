"""Flower compatibility: run Flower ``NumPyClient`` code with insitu, without flwr installed.

- :class:`~insitu.flower.adapter.NumPyClientAdapter`: a Flower client as an insitu ``Client``.
- :func:`~insitu.flower.adapter.adapt_client_fn`: a Flower-style ``client_fn`` for ``insitu.simulate``
  (which applies it itself).
- :func:`~insitu.flower.start.start_numpy_client`: serve a Flower client to ``insitu server``; also
  reachable as ``insitu.flwr.client.start_numpy_client`` so ``import insitu.flwr as fl`` replaces
  ``import flwr as fl`` in client scripts.

docs/flower-migration.md maps Flower's concepts to insitu's.
"""

from __future__ import annotations

from insitu.flower.adapter import (
    Context,
    FlowerClientError,
    FlowerClientFn,
    NumPyClientAdapter,
    adapt_client_fn,
    initial_parameters,
    is_flower_client,
    to_parameters,
    unwrap,
)
from insitu.flower.start import start_client, start_numpy_client

__all__ = [
    "Context",
    "FlowerClientError",
    "FlowerClientFn",
    "NumPyClientAdapter",
    "adapt_client_fn",
    "initial_parameters",
    "is_flower_client",
    "start_client",
    "start_numpy_client",
    "to_parameters",
    "unwrap",
]
