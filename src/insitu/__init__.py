"""insitu: federated learning for PyTorch — fast simulation and real deployment, same client code."""

from insitu import aggregation, attacks, data, models
from insitu.client import Client, EvalResult, FitResult, TorchClient, TrainSettings
from insitu.client.state import DiskState, MemoryStates
from insitu.params import Parameters
from insitu.run import Coordinator, History, RunResult
from insitu.simulation import central_evaluator, simulate
from insitu.strategies import Strategy, fedavg, fedprox, fedsgd, scaffold

__version__ = "0.1.0"

__all__ = [
    "Client", "Coordinator", "DiskState", "EvalResult", "FitResult", "History", "MemoryStates", "Parameters",
    "RunResult", "Strategy", "TorchClient", "TrainSettings", "aggregation", "attacks", "central_evaluator", "data",
    "fedavg", "fedprox", "fedsgd", "models", "scaffold", "simulate",
]
