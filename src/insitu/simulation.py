"""Simulation: many virtual clients in one process, driven by the same round loop as deployment.

``simulate`` is the Python entry point for user-written clients; ``SimulationConfig`` +
``run_simulation`` build the whole experiment (data, partition, model, clients, strategy) from plain
settings, which is what the CLI and the benchmarks use.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from insitu.client.torch_client import TorchClient, TrainSettings, evaluate_model
from insitu.data import PARTITION_NAMES, TensorDataset, load_dataset, partition
from insitu.engines.base import ClientPool
from insitu.engines.heap import frozen_heap
from insitu.engines.inprocess import ClientFn, InProcessPool
from insitu.models import build_model
from insitu.params import Parameters, flatten_module_
from insitu.run.loop import Coordinator, RoundCallback, RunResult
from insitu.strategies import STRATEGY_NAMES, Strategy, fedavg, fedsgd
from insitu.strategies.strategy import CentralEvaluator

def simulate(
    client_fn: ClientFn,
    *,
    num_clients: int,
    strategy: Strategy,
    num_rounds: int,
    initial_parameters: Parameters,
    seed: int = 0,
    on_round: RoundCallback | None = None,
    pool: ClientPool | None = None,
) -> RunResult:
    """Run ``num_rounds`` of ``strategy`` over ``num_clients`` virtual clients made by ``client_fn``.

    ``client_fn(cid)`` is called whenever client ``cid`` ("0" .. "N-1") is needed; keep it cheap
    (share one model object, pass index lists rather than copies of the data).
    """
    pool = pool if pool is not None else InProcessPool(client_fn, num_clients)
    coordinator = Coordinator(strategy, pool, num_rounds=num_rounds, seed=seed, on_round=on_round)
    try:
        with frozen_heap():  # no full-heap GC pauses in the middle of rounds
            return coordinator.run(initial_parameters)
    finally:
        pool.close()


def central_evaluator(model: nn.Module, test: TensorDataset, batch_size: int = 1024) -> CentralEvaluator:
    """An ``evaluate_fn`` that loads the global parameters into ``model`` and scores it on ``test``."""

    def evaluate(server_round: int, parameters: Parameters) -> tuple[float, dict[str, float]]:
        parameters.to_module(model)
        loss, accuracy, _ = evaluate_model(model, test, batch_size=batch_size)
        return loss, {"accuracy": accuracy}

    return evaluate


@dataclass
class SimulationConfig:
    """Every setting of a simulated experiment; the CLI's flags and TOML keys map onto these."""

    dataset: str = "digits"
    data_dir: str | None = None
    partition: str = "iid"
    alpha: float = 0.5
    shards_per_client: int = 2
    num_clients: int = 10
    fraction_fit: float = 1.0
    min_fit_clients: int = 1
    fraction_evaluate: float = 0.0
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    optimizer: str = "sgd"
    model: str = "2nn"
    strategy: str = "fedavg"
    seed: int = 0
    train_limit: int = 0  # use only the first N training examples (0 = all): quick tries and tests
    test_limit: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SimulationConfig:
        """Build from TOML/CLI keys (dashes or underscores); unknown keys are an error naming them."""
        known = {f.name: f for f in fields(cls)}
        normalized = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalized) - set(known))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")
        return cls(**normalized)

    def validate(self) -> None:
        """Fail before any data is loaded on settings that cannot work."""
        if self.partition not in PARTITION_NAMES:
            raise ValueError(f"unknown partition {self.partition!r}; choose one of {', '.join(PARTITION_NAMES)}")
        if self.strategy not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGY_NAMES)}")
        if self.num_clients < 1 or self.rounds < 1:
            raise ValueError("num_clients and rounds must be >= 1")
        if self.min_fit_clients > self.num_clients:
            raise ValueError(f"min_fit_clients ({self.min_fit_clients}) exceeds num_clients ({self.num_clients})")
        if self.partition in ("dirichlet", "quantity") and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        TrainSettings(self.local_epochs, self.batch_size, self.lr, self.optimizer, self.momentum)


@dataclass
class Experiment:
    """A built simulation: data, partitions, the shared model and everything needed to run."""

    config: SimulationConfig
    train: TensorDataset
    test: TensorDataset
    train_parts: list[np.ndarray]
    test_parts: list[np.ndarray]
    model: nn.Module
    strategy: Strategy
    client_fn: ClientFn
    initial_parameters: Parameters


def build_experiment(config: SimulationConfig) -> Experiment:
    """Load data, partition it, build one shared model and the strategy; nothing trains yet."""
    config.validate()
    train = _limit(load_dataset(config.dataset, "train", config.data_dir), config.train_limit)
    test = _limit(load_dataset(config.dataset, "test", config.data_dir), config.test_limit)
    labels = train.labels_numpy()
    train_parts = partition(labels, config.num_clients, config.partition, seed=config.seed,
                            alpha=config.alpha, shards_per_client=config.shards_per_client)
    test_parts: list[np.ndarray] = []
    if config.fraction_evaluate > 0:
        test_parts = partition(test.labels_numpy(), config.num_clients, config.partition, seed=config.seed + 1,
                               alpha=config.alpha, shards_per_client=config.shards_per_client)
    torch.manual_seed(config.seed)
    model = build_model(config.model, train.input_shape, train.num_classes)
    flatten_module_(model)  # one copy to load or snapshot the shared model, not one per tensor
    settings = TrainSettings(config.local_epochs, config.batch_size, config.lr, config.optimizer, config.momentum)

    def client_fn(cid: str) -> TorchClient:
        i = int(cid)
        return TorchClient(model, train, test if test_parts else None, train_indices=train_parts[i],
                           test_indices=test_parts[i] if test_parts else None, settings=settings,
                           share_result=True)

    strategy = make_strategy(config, central_evaluator(model, test))
    return Experiment(config, train, test, train_parts, test_parts, model, strategy, client_fn,
                      Parameters.from_module(model))


def make_strategy(config: SimulationConfig, evaluate_fn: CentralEvaluator | None, *, remote: bool = False) -> Strategy:
    """The strategy named in ``config`` with its sampling settings.

    In simulation every client is always there and gets its training settings when it is built.
    A ``remote`` server instead waits for ``num_clients`` connections and sends the training
    settings with every task.
    """
    factory = fedsgd if config.strategy == "fedsgd" else fedavg
    fit_config: dict[str, Any] = {}
    if remote:
        fit_config = {"local_epochs": config.local_epochs, "batch_size": config.batch_size,
                      "lr": config.lr, "momentum": config.momentum}
    return factory(
        fraction_fit=config.fraction_fit,
        min_fit_clients=config.min_fit_clients,
        min_available_clients=config.num_clients if remote else max(config.min_fit_clients, 1),
        fraction_evaluate=config.fraction_evaluate,
        fit_config=fit_config,
        evaluate_fn=evaluate_fn,
    )


def run_simulation(config: SimulationConfig, on_round: RoundCallback | None = None) -> tuple[Experiment, RunResult]:
    """Build and run an experiment; the final global parameters are left in ``experiment.model``."""
    experiment = build_experiment(config)
    result = simulate(experiment.client_fn, num_clients=config.num_clients, strategy=experiment.strategy,
                      num_rounds=config.rounds, initial_parameters=experiment.initial_parameters,
                      seed=config.seed, on_round=on_round)
    result.parameters.to_module(experiment.model)
    return experiment, result


def _limit(data: TensorDataset, limit: int) -> TensorDataset:
    return data if limit <= 0 or limit >= len(data) else data.subset(np.arange(limit))


def save_model(model: nn.Module, path: str | Path) -> None:
    """A plain state_dict, loadable with ``torch.load`` + ``load_state_dict``."""
    torch.save(model.state_dict(), path)
