"""insitu: federated learning for PyTorch — fast simulation and real deployment, same client code."""

from insitu import data, models
from insitu.client import Client, EvalResult, FitResult, TorchClient, TrainSettings
from insitu.params import Parameters
from insitu.run import Coordinator, History, RunResult
from insitu.simulation import central_evaluator, simulate
from insitu.strategies import Strategy, fedavg, fedsgd

__version__ = "0.1.0"

__all__ = [
    "Client", "Coordinator", "EvalResult", "FitResult", "History", "Parameters", "RunResult", "Strategy",
    "TorchClient", "TrainSettings", "central_evaluator", "data", "fedavg", "fedsgd", "models", "simulate",
]
