"""Client algorithms, both halves: what the server adds to a fit task and folds back from its result,
and what the client's training loop does with it. One module per algorithm; the registry below maps
the name a task's config carries (``config["algorithm"]``) to the algorithm."""

from __future__ import annotations

from typing import TYPE_CHECKING

from insitu.algorithms.base import (
    ALGORITHM,
    AlgorithmState,
    ClientAlgorithm,
    Extras,
    FitContext,
    GradHook,
    LocalRound,
    check_extras,
)
from insitu.algorithms.fedprox import PROXIMAL_MU, FedProx
from insitu.algorithms.local_sgd import LocalSGD
from insitu.algorithms.scaffold import SCAFFOLD_C, SCAFFOLD_DELTA_C, SCAFFOLD_STATE, Scaffold

if TYPE_CHECKING:
    from insitu.client.api import Config

ALGORITHMS: dict[str, type[ClientAlgorithm]] = {}
"""Every client algorithm this process knows, by the name its tasks carry (see :func:`register_algorithm`)."""


def register_algorithm(algorithm: type[ClientAlgorithm]) -> type[ClientAlgorithm]:
    """Make ``algorithm`` known by its ``name``, to clients (which run its client half when a task names it)
    and to servers (which accept the extras it declares); usable as a class decorator. Both ends of a
    deployment must register it."""
    known = ALGORITHMS.get(algorithm.name)
    if known is not None and known is not algorithm:
        raise ValueError(f"a client algorithm named {algorithm.name!r} is already registered ({known.__name__})")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


for _builtin in (LocalSGD, FedProx, Scaffold):
    register_algorithm(_builtin)


def result_extras() -> frozenset[str]:
    """The names of every extra array some registered algorithm's results carry (a server refuses others)."""
    return frozenset(extra for algorithm in ALGORITHMS.values() for extra in algorithm.result_extras)


class UnknownAlgorithmError(ValueError):
    """A task names a client algorithm this client does not have (an older insitu than the server's)."""


def algorithm_for(config: Config) -> type[ClientAlgorithm]:
    """The algorithm ``config`` names (plain local SGD when it names none), or an error saying to upgrade."""
    name = config.get(ALGORITHM, LocalSGD.name)
    algorithm = ALGORITHMS.get(name) if isinstance(name, str) else None
    if algorithm is None:
        raise UnknownAlgorithmError(f"this client does not know algorithm {name!r} (it knows "
                                    f"{', '.join(ALGORITHMS)}): upgrade insitu on this client to the server's version")
    return algorithm


__all__ = [
    "ALGORITHM",
    "ALGORITHMS",
    "PROXIMAL_MU",
    "SCAFFOLD_C",
    "SCAFFOLD_DELTA_C",
    "SCAFFOLD_STATE",
    "AlgorithmState",
    "ClientAlgorithm",
    "Extras",
    "FedProx",
    "FitContext",
    "GradHook",
    "LocalRound",
    "LocalSGD",
    "Scaffold",
    "UnknownAlgorithmError",
    "algorithm_for",
    "check_extras",
    "register_algorithm",
    "result_extras",
]
