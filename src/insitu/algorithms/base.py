"""What every client algorithm is made of: a server half, a client half, and the key that joins them.

A client algorithm is one class (:class:`ClientAlgorithm`). Its server half adds to each fit task's
config, including its own name under :data:`ALGORITHM`, and folds the results back into its state.
Its client half, the static ``client_half``, is found on the client by that name in the registry
(the client never builds the object: what it needs travels in the config); it is called once per
fit with a :class:`FitContext` and returns a :class:`LocalRound`, the hooks the training loop calls.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn

from insitu.params import Parameters, ParamSpec, describe_mismatch

if TYPE_CHECKING:
    from insitu.client.api import Config, FitResult
    from insitu.client.state import ClientState

ALGORITHM = "algorithm"  # config: the name of the client algorithm the task runs (a registry key)

AlgorithmState = dict[str, np.ndarray]
Extras = dict[str, Parameters]
GradHook = Callable[[], None]


class ClientAlgorithm(Protocol):
    """The server's half of a client algorithm: extra task config, result checks, state updates."""

    name: ClassVar[str]  # the registry key its fit_config sends under ALGORITHM
    secure_compatible: ClassVar[bool]  # True when results carry nothing beyond the update (secure aggregation hides it)
    result_extras: ClassVar[tuple[str, ...]]  # the names of the extras every result must carry (and no others)

    def init_state(self, parameters: Parameters) -> AlgorithmState: ...

    def fit_config(self, state: AlgorithmState, specs: tuple[ParamSpec, ...]) -> Config: ...

    def check_result(self, result: FitResult, specs: tuple[ParamSpec, ...]) -> str | None: ...

    def start(self, dim: int) -> Any: ...

    def add(self, acc: Any, result: FitResult) -> Any: ...

    def finish(self, acc: Any, state: AlgorithmState, num_clients: int) -> AlgorithmState: ...

    @staticmethod
    def client_half(fit: FitContext) -> LocalRound:
        """The client's half: the hooks for one fit, built from the task's config and the client's state."""
        ...


class FitContext(NamedTuple):
    """What a client half sees at the start of one fit: the model already holding ``sent`` (the global
    parameters of this task), the task's config, the (fresh) optimizer and the client's state store."""

    model: nn.Module
    sent: Parameters
    config: Config
    optimizer: torch.optim.Optimizer
    state: ClientState | None

    def require_state(self, algorithm: str) -> ClientState:
        """The state store, or an error saying how to give the client one."""
        if self.state is None:
            raise ValueError(f"{algorithm} keeps state per client between rounds: give this client a state store "
                             "(state=MemoryStates().for_client(cid) in simulation, DiskState(folder) in a deployed "
                             "client)")
        return self.state

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """The model's parameters that train, by name, in the model's order."""
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]


def _no_extras() -> Extras:
    return {}


class LocalRound(NamedTuple):
    """A client half's hooks for one fit. ``after_backward`` runs after each backward pass, before the
    optimizer step (a gradient correction); None leaves the loop plain. ``after_training`` returns the
    result extras."""

    after_backward: GradHook | None = None
    after_training: Callable[[], Extras] = _no_extras


def check_extras(result: FitResult, specs: tuple[ParamSpec, ...], expected: Collection[str], algorithm: str) -> str | None:
    """Why ``result``'s extras are not exactly ``expected``, each a finite array set shaped like the
    model; None if they are."""
    stray = sorted(set(result.extras) - set(expected))
    if stray:
        return f"{algorithm} results carry no extras named {', '.join(map(repr, stray))}"
    for name in expected:
        extra = result.extras.get(name)
        if extra is None:
            return f"{algorithm} needs {name!r} in the result extras"
        if not isinstance(extra, Parameters):
            return f"{name} is a {type(extra).__name__}, expected insitu.Parameters"
        problem = describe_mismatch(extra.specs, specs)
        if problem:
            return f"{name} does not match the model: {problem}"
        if not np.isfinite(extra.flat()).all():
            return f"{name} contains NaN or Inf"
    return None
