"""The server halves of the client algorithms, where strategies import them; both halves of each live
in :mod:`insitu.algorithms`."""

from insitu.algorithms import AlgorithmState, ClientAlgorithm, FedProx, LocalSGD, Scaffold

local_sgd = LocalSGD  # the default algorithm factory of Strategy

__all__ = ["AlgorithmState", "ClientAlgorithm", "FedProx", "LocalSGD", "Scaffold", "local_sgd"]
