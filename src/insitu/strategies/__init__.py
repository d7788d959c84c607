"""Strategies: the server side of federated algorithms, by composition."""

from insitu.strategies.server_optimizers import ServerOptimizer, ServerSGD, sgd
from insitu.strategies.strategy import Aggregate, Strategy, fedavg, fedsgd

STRATEGY_NAMES = ("fedavg", "fedsgd")

__all__ = ["Aggregate", "STRATEGY_NAMES", "ServerOptimizer", "ServerSGD", "Strategy", "fedavg", "fedsgd", "sgd"]
