"""Strategies: the server side of federated algorithms, by composition."""

from insitu.strategies.algorithms import ClientAlgorithm, FedProx, LocalSGD, Scaffold
from insitu.strategies.schedules import SCHEDULE_NAMES, lr_config, make_schedule
from insitu.strategies.server_optimizers import (
    SERVER_OPTIMIZER_NAMES,
    ServerAdaptive,
    ServerMomentum,
    ServerOptimizer,
    ServerSGD,
    fedadagrad,
    fedadam,
    fedavgm,
    fedyogi,
    make_server_optimizer,
    sgd,
)
from insitu.strategies.strategy import Aggregate, ServerState, Strategy, fedavg, fedprox, fedsgd, scaffold

# Named strategies of the CLI and SimulationConfig; the last four are FedAvg with that server optimizer.
STRATEGY_NAMES = ("fedavg", "fedsgd", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad")

__all__ = [
    "SCHEDULE_NAMES",
    "SERVER_OPTIMIZER_NAMES",
    "STRATEGY_NAMES",
    "Aggregate",
    "ClientAlgorithm",
    "FedProx",
    "LocalSGD",
    "Scaffold",
    "ServerAdaptive",
    "ServerMomentum",
    "ServerOptimizer",
    "ServerSGD",
    "ServerState",
    "Strategy",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedsgd",
    "fedyogi",
    "lr_config",
    "make_schedule",
    "make_server_optimizer",
    "scaffold",
    "sgd",
]
