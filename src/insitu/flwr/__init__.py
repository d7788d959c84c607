"""Flower-compatible names for client code: ``import insitu.flwr as fl`` in place of ``import flwr as fl``.

A Flower client script (a ``NumPyClient`` subclass started with ``fl.client.start_numpy_client``) then
runs against ``insitu server`` unchanged: ``fl.client`` and ``fl.common`` provide what such client code
uses. Flower's server side (``fl.server``, ``fl.simulation``) is not re-implemented: run
``insitu server`` (or ``insitu.simulate``) instead; docs/flower-migration.md maps the concepts.
flwr itself is not needed.
"""

from __future__ import annotations

from insitu.flwr import client, common

__all__ = ["client", "common"]

_SERVER_SIDE = {
    "server": "run `insitu server --insecure --model MODEL ...` (or with --certs) instead of fl.server.start_server",
    "simulation": "call insitu.simulate(client_fn=..., ...) instead of fl.simulation.start_simulation",
}


def __getattr__(name: str) -> object:
    """Name the insitu replacement of Flower's server-side modules, which this shim does not provide."""
    if name in _SERVER_SIDE:
        raise AttributeError(f"insitu.flwr has no {name!r}: it covers Flower's client side only; "
                             f"{_SERVER_SIDE[name]} (docs/flower-migration.md)")
    raise AttributeError(f"module 'insitu.flwr' has no attribute {name!r}")
