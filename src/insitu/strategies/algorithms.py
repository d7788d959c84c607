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
    total: np.ndarray  # sum of w_i delta_c_i
    weight: float = 0.0  # sum of w_i
    count: int = 0


@dataclass(frozen=True)
class Scaffold:
    """SCAFFOLD (Karimireddy et al. 2020) with option II control variates.

    The server sends its control variate c; each client corrects every local gradient by
    (c - c_i) and returns delta_c = c_i+ - c_i, where c_i+ is its raw minibatch gradients over the K
    local steps averaged with the weight its optimizer gave each in the distance moved (under plain
    SGD the mean, exactly option II's c_i - c + (x - y) / (K lr); under momentum option II with the
    effective step count; under Adam the mean bias-corrected first moment). See the client's
    ``_ScaffoldStep``.

    c must be the gradient of the objective the server descends, or the corrected local objectives
    f_i(y) + <c - c_i, y> do not add up to it and the correction biases every step. With
    ``weighted`` (the default, matching FedAvg's example-weighted mean) c is the example-weighted
    mean of the c_i: c <- c + (|S| / N) sum_S n_i delta_c_i / sum_S n_i, N being the number of
    clients in the federation (exact when every client takes part; with sampling the total example
    count is estimated from the sample's). With ``weighted=False`` (for a reducer that ignores
    example counts, such as the median) c is the plain mean: c <- c + sum_S delta_c_i / N, as in the
    paper.
    """

    name: str = "scaffold"
    secure_compatible: bool = False  # delta_c travels per client, in the clear
    weighted: bool = True

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
        weight = float(result.num_examples) if self.weighted else 1.0
        if weight > 0:
            acc.total += np.float32(weight) * result.extras[SCAFFOLD_DELTA_C].flat()
            acc.weight += weight
        acc.count += 1
        return acc

    def finish(self, acc: _DeltaSum, state: AlgorithmState, num_clients: int) -> AlgorithmState:
        if acc.count == 0 or acc.weight == 0:
            return state
        share = acc.count / max(num_clients, acc.count)  # the sampled share of the federation
        c = state["c"] + acc.total * np.float32(share / acc.weight)
        return {"c": c.astype(np.float32, copy=False)}


def local_sgd() -> LocalSGD:
    return LocalSGD()


def fedprox_algorithm(mu: float) -> FedProx:
    return FedProx(mu=mu)


def scaffold_algorithm(weighted: bool = True) -> Scaffold:
    return Scaffold(weighted=weighted)
