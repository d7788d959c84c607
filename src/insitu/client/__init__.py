"""The Client protocol and the ready TorchClient."""

from insitu.client.api import Client, Config, EvalResult, FitResult, Metrics
from insitu.client.torch_client import TorchClient, TrainSettings, evaluate_model

__all__ = ["Client", "Config", "EvalResult", "FitResult", "Metrics", "TorchClient", "TrainSettings", "evaluate_model"]
