"""Plain local training (FedAvg, FedSGD): the client runs the loop as is; only the name travels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from insitu.algorithms.base import ALGORITHM, AlgorithmState, FitContext, LocalRound, check_extras
from insitu.params import Parameters, ParamSpec

if TYPE_CHECKING:
    from insitu.client.api import Config, FitResult


class StatelessServerHalf:
    """The server half of an algorithm that keeps no server state and expects no extras back: it only
    names itself in the task config (subclasses add what they send)."""

    name: ClassVar[str]
    secure_compatible: ClassVar[bool] = True
    result_extras: ClassVar[tuple[str, ...]] = ()

    def init_state(self, parameters: Parameters) -> AlgorithmState:
        return {}

    def fit_config(self, state: AlgorithmState, specs: tuple[ParamSpec, ...]) -> Config:
        return {ALGORITHM: self.name}

    def check_result(self, result: FitResult, specs: tuple[ParamSpec, ...]) -> str | None:
        return check_extras(result, specs, self.result_extras, self.name)

    def start(self, dim: int) -> None:
        return None

    def add(self, acc: None, result: FitResult) -> None:
        return None

    def finish(self, acc: None, state: AlgorithmState, num_clients: int) -> AlgorithmState:
        return state


@dataclass(frozen=True)
class LocalSGD(StatelessServerHalf):
    """FedAvg's client algorithm: local SGD epochs, nothing extra either way, no server state."""

    name: ClassVar[str] = "local_sgd"

    @staticmethod
    def client_half(fit: FitContext) -> LocalRound:
        return LocalRound()
