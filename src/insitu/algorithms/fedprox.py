"""FedProx (Li et al. 2020): clients minimise loss + mu/2 ||w - w_global||^2.

Server half: sends mu. Client half: adds mu (w - w_global) to every gradient, w_global being the
parameters this task was sent (so a client doing fewer local epochs is still pulled to that model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from insitu.algorithms.base import ALGORITHM, AlgorithmState, FitContext, LocalRound
from insitu.algorithms.local_sgd import StatelessServerHalf
from insitu.params import ParamSpec

if TYPE_CHECKING:
    from insitu.client.api import Config

PROXIMAL_MU = "proximal_mu"  # config: the proximal weight mu (a float)


def proximal_weight(value: object) -> float:
    """``value`` as FedProx's mu, or an error: mu must be a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"FedProx needs a proximal weight mu >= 0 ({PROXIMAL_MU!r}), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class FedProx(StatelessServerHalf):
    """FedProx with proximal weight ``mu`` (0 is FedAvg)."""

    mu: float = 0.01
    name: ClassVar[str] = "fedprox"

    def __post_init__(self) -> None:
        proximal_weight(self.mu)

    def fit_config(self, state: AlgorithmState, specs: tuple[ParamSpec, ...]) -> Config:
        return {ALGORITHM: self.name, PROXIMAL_MU: float(self.mu)}

    @staticmethod
    def client_half(fit: FitContext) -> LocalRound:
        """Adds mu (w - w_global) to each gradient: the gradient of mu/2 ||w - w_global||^2."""
        mu = proximal_weight(fit.config.get(PROXIMAL_MU))
        if mu == 0:
            return LocalRound()
        sent = dict(fit.sent)
        pairs = []
        for name, param in fit.trainable():
            if name not in sent:
                raise ValueError(f"FedProx anchors every trainable parameter at the global model, but the task's "
                                 f"parameters have no {name!r}")
            pairs.append((param, torch.tensor(sent[name], dtype=param.dtype, device=param.device).view_as(param)))

        def after_backward() -> None:
            with torch.no_grad():
                for param, anchor in pairs:
                    if param.grad is not None:
                        param.grad.add_(param - anchor, alpha=mu)

        return LocalRound(after_backward)
