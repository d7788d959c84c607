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

_ALL: tuple[type[ClientAlgorithm], ...] = (LocalSGD, FedProx, Scaffold)
ALGORITHMS: dict[str, type[ClientAlgorithm]] = {algorithm.name: algorithm for algorithm in _ALL}
"""Every client algorithm this insitu knows, by the name its tasks carry."""
RESULT_EXTRAS = frozenset(extra for algorithm in _ALL for extra in algorithm.result_extras)
"""The names of every extra array some algorithm's results carry (a server refuses others)."""


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
    "RESULT_EXTRAS",
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
]
