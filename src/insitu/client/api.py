"""The user-facing client contract, shared by simulation and deployment.

A ``Client`` is written once and runs unchanged whether the engine calls it in-process or a remote
process calls it on behalf of a gRPC server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from insitu.params import Parameters

Scalar = bool | int | float | str
ConfigValue = Scalar | Parameters
Config = dict[str, ConfigValue]
"""Per-round settings from the server. Values are scalars, or named arrays (``Parameters``) that an
algorithm needs on the client, such as SCAFFOLD's server control variate; both travel by name."""
Metrics = dict[str, float]


@dataclass
class FitResult:
    """What a client returns after local training: new parameters, how many examples, metrics."""

    parameters: Parameters
    num_examples: int
    metrics: Metrics = field(default_factory=dict)
    extras: dict[str, Parameters] = field(default_factory=dict)
    """Named arrays an algorithm sends back besides the model (e.g. SCAFFOLD's control-variate delta)."""


@dataclass
class EvalResult:
    """What a client returns after evaluating the global parameters on its own data."""

    loss: float
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


@runtime_checkable
class Client(Protocol):
    """Anything with ``fit`` and ``evaluate`` taking the global parameters and a server config."""

    def fit(self, parameters: Parameters, config: Config) -> FitResult: ...

    def evaluate(self, parameters: Parameters, config: Config) -> EvalResult: ...
