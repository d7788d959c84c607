"""Client algorithms, server side: what a strategy adds to each fit task and folds back from results.

The client side lives in :class:`insitu.client.TorchClient`, which reacts to the config keys named
here. Plain local SGD (FedAvg) adds nothing; FedProx sends its proximal weight; SCAFFOLD sends the
server control variate and folds the clients' control-variate deltas into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from insitu.client.api import Config, FitResult
from insitu.client.torch_client import SCAFFOLD_C, SCAFFOLD_DELTA_C
from insitu.params import Parameters, ParamSpec, describe_mismatch

PROXIMAL_MU = "proximal_mu"  # TrainSettings.proximal_mu

AlgorithmState = dict[str, np.ndarray]


class ClientAlgorithm(Protocol):
    """The server's half of a client algorithm: extra task config, result checks, state updates."""

    name: str
    secure_compatible: bool  # True when results carry nothing beyond the update (secure aggregation hides it)

    def init_state(self, parameters: Parameters) -> AlgorithmState: ...

    def fit_config(self, state: AlgorithmState, specs: tuple[ParamSpec, ...]) -> Config: ...

    def check_result(self, result: FitResult, specs: tuple[ParamSpec, ...]) -> str | None: ...

    def start(self, dim: int) -> Any: ...

    def add(self, acc: Any, result: FitResult) -> Any: ...

    def finish(self, acc: Any, state: AlgorithmState, num_clients: int) -> AlgorithmState: ...


@dataclass(frozen=True)
class LocalSGD:
    """Plain local training (FedAvg, FedSGD): nothing extra travels, no server state."""

    name: str = "local_sgd"
    secure_compatible: bool = True

    def init_state(self, parameters: Parameters) -> AlgorithmState:
        return {}

    def fit_config(self, state: AlgorithmState, specs: tuple[ParamSpec, ...]) -> Config:
        return {}

    def check_result(self, result: FitResult, specs: tuple[ParamSpec, ...]) -> str | None:
        return None

    def start(self, dim: int) -> None:
        return None

    def add(self, acc: None, result: FitResult) -> None:
        return None

    def finish(self, acc: None, state: AlgorithmState, num_clients: int) -> AlgorithmState:
        return state


@dataclass(frozen=True)
class FedProx(LocalSGD):
    """FedProx (Li et al. 2020): clients minimise loss + mu/2 ||w - w_global||^2."""

    mu: float = 0.01
    name: str = "fedprox"

    def __post_init__(self) -> None:
        if not (isinstance(self.mu, (int, float)) and np.isfinite(self.mu) and self.mu >= 0):
            raise ValueError(f"FedProx needs a proximal weight mu >= 0, got {self.mu!r}")

    def fit_config(self, state: AlgorithmState, specs: tuple[ParamSpec, ...]) -> Config:
        return {PROXIMAL_MU: float(self.mu)}


@dataclass
class _DeltaSum:
    total: np.ndarray
    count: int = 0


@dataclass(frozen=True)
class Scaffold:
    """SCAFFOLD (Karimireddy et al. 2020), option II control variates.

    The server sends its control variate c; each client corrects every local gradient by
    (c - c_i), then returns delta_c = c_i+ - c_i with c_i+ = c_i - c + (x - y) / (K lr). The server
    updates c <- c + sum(delta_c) / N, N being the number of clients in the federation.
    """

    name: str = "scaffold"
    secure_compatible: bool = False  # delta_c travels per client, in the clear

    def init_state(self, parameters: Parameters) -> AlgorithmState:
        return {"c": np.zeros(parameters.num_values, dtype=np.float32)}

    def fit_config(self, state: AlgorithmState, specs: tuple[ParamSpec, ...]) -> Config:
        return {SCAFFOLD_C: Parameters.from_flat(state["c"], specs)}

    def check_result(self, result: FitResult, specs: tuple[ParamSpec, ...]) -> str | None:
        delta_c = result.extras.get(SCAFFOLD_DELTA_C)
        if delta_c is None:
            return f"SCAFFOLD needs the client's control-variate delta ({SCAFFOLD_DELTA_C!r}) in the result extras"
        if not isinstance(delta_c, Parameters):
            return f"{SCAFFOLD_DELTA_C} is a {type(delta_c).__name__}, expected insitu.Parameters"
        problem = describe_mismatch(delta_c.specs, specs)
        if problem:
            return f"{SCAFFOLD_DELTA_C} does not match the model: {problem}"
        if not np.isfinite(delta_c.flat()).all():
            return f"{SCAFFOLD_DELTA_C} contains NaN or Inf"
        return None

    def start(self, dim: int) -> _DeltaSum:
        return _DeltaSum(np.zeros(dim, dtype=np.float32))

    def add(self, acc: _DeltaSum, result: FitResult) -> _DeltaSum:
        acc.total += result.extras[SCAFFOLD_DELTA_C].flat()
        acc.count += 1
        return acc

    def finish(self, acc: _DeltaSum, state: AlgorithmState, num_clients: int) -> AlgorithmState:
        if acc.count == 0:
            return state
        c = state["c"] + acc.total / np.float32(max(num_clients, acc.count))
        return {"c": c.astype(np.float32, copy=False)}


def local_sgd() -> LocalSGD:
    return LocalSGD()


def fedprox_algorithm(mu: float) -> FedProx:
    return FedProx(mu=mu)


def scaffold_algorithm() -> Scaffold:
    return Scaffold()
