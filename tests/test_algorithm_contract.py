"""The contract every registered client algorithm keeps: the server half's task config names it and
reaches its client half by that name (also after the trip over the wire), the client's result passes
the server half's checks, malformed extras do not, and a name the client does not know fails the task."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from insitu import serde
from insitu.algorithms import (
    ALGORITHM,
    ALGORITHMS,
    ClientAlgorithm,
    LocalSGD,
    UnknownAlgorithmError,
    algorithm_for,
    register_algorithm,
    result_extras,
)
from insitu.client.api import Config, FitResult
from insitu.client.state import MemoryStates
from insitu.client.torch_client import TorchClient, TrainSettings
from insitu.data.datasets import TensorDataset
from insitu.engines import InProcessPool
from insitu.params import Parameters
from insitu.run.loop import Coordinator
from insitu.strategies import Strategy

EVERY = [pytest.param(algorithm, id=name) for name, algorithm in ALGORITHMS.items()]


def problem(seed: int = 0) -> tuple[nn.Module, TensorDataset]:
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(12, 3, generator=gen), torch.randint(0, 2, (12,), generator=gen), 2, "toy")
    torch.manual_seed(seed)
    return nn.Linear(3, 2), data


def over_the_wire(config: Config) -> Config:
    """The config as a remote client decodes it: scalars through JSON, arrays through insitu's serde."""
    scalars = {k: v for k, v in config.items() if not isinstance(v, Parameters)}
    arrays = {k: serde.loads(serde.dumps(v)) for k, v in config.items() if isinstance(v, Parameters)}
    assert set(scalars) | set(arrays) == set(config)  # nothing else may travel
    return {**json.loads(json.dumps(scalars)), **arrays}


def fitted(algorithm: type[ClientAlgorithm]) -> tuple[ClientAlgorithm, Parameters, FitResult]:
    """(server half, global parameters, one client's result) for one task of ``algorithm``."""
    server = algorithm()
    model, data = problem()
    start = Parameters.from_module(model)
    config = over_the_wire(server.fit_config(server.init_state(start), start.specs))
    client = TorchClient(model, data, settings=TrainSettings(local_epochs=2, batch_size=4, lr=0.1),
                         state=MemoryStates().for_client("0"))
    return server, start, client.fit(start, {**config, "seed": 1})


def test_the_registry_is_keyed_by_each_algorithms_own_name() -> None:
    assert set(ALGORITHMS) == {"local_sgd", "fedprox", "scaffold"}
    assert all(algorithm.name == name for name, algorithm in ALGORITHMS.items())
    assert result_extras() == {extra for algorithm in ALGORITHMS.values() for extra in algorithm.result_extras}
    assert algorithm_for({}) is LocalSGD  # a task that names none is plain local training


@pytest.mark.parametrize("algorithm", EVERY)
def test_fit_config_reaches_the_client_half_by_name_and_its_result_passes_the_server_check(algorithm) -> None:
    server, start, result = fitted(algorithm)
    config = over_the_wire(server.fit_config(server.init_state(start), start.specs))
    assert config[ALGORITHM] == algorithm.name and algorithm_for(config) is algorithm
    assert server.check_result(result, start.specs) is None
    assert set(result.extras) == set(algorithm.result_extras)
    assert not (algorithm.secure_compatible and algorithm.result_extras)  # secure aggregation would expose them
    state = server.finish(server.add(server.start(start.num_values), result), server.init_state(start), 1)
    assert all(np.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize("algorithm", EVERY)
def test_result_checks_reject_malformed_extras(algorithm) -> None:
    server, start, good = fitted(algorithm)
    bad: dict[str, dict] = {"smuggled": {**good.extras, "smuggled": start}}  # an extra it does not expect
    for name in algorithm.result_extras:
        extra = good.extras[name]
        bad[name + ": missing"] = {k: v for k, v in good.extras.items() if k != name}
        bad[name + ": not Parameters"] = {**good.extras, name: extra.flat()}
        bad[name + ": wrong shape"] = {**good.extras, name: Parameters.from_arrays({"w": np.zeros(3, np.float32)})}
        nan = extra.flat().copy()
        nan[0] = np.nan
        bad[name + ": NaN"] = {**good.extras, name: Parameters.from_flat(nan, start.specs)}
    for case, extras in bad.items():
        reason = server.check_result(replace(good, extras=extras), start.specs)
        assert reason is not None, case
        assert case.split(":")[0] in reason


@pytest.mark.parametrize("name", ["fedfuture", "", 3])
def test_a_client_refuses_an_algorithm_it_does_not_know_and_leaves_its_model_alone(name) -> None:
    model, data = problem()
    before = Parameters.from_module(model)
    sent = Parameters.from_flat(np.ones(before.num_values, np.float32), before.specs)
    client = TorchClient(model, data, state=MemoryStates().for_client("0"))
    with pytest.raises(UnknownAlgorithmError, match=f"does not know algorithm {name!r}.*upgrade insitu"):
        client.fit(sent, {ALGORITHM: name})
    assert Parameters.from_module(model) == before


@dataclass(frozen=True)
class FromTheFuture(LocalSGD):
    """A server half a newer insitu might have."""

    name: ClassVar[str] = "fedfuture"


def test_an_unknown_algorithm_fails_that_task_and_the_server_records_why() -> None:
    model, data = problem()
    strategy = Strategy(algorithm=FromTheFuture(), min_fit_clients=1, min_available_clients=1, fraction_evaluate=0.0)
    start = Parameters.from_module(model)
    pool = InProcessPool(lambda cid: TorchClient(model, data), 1)
    record, parameters, _ = Coordinator(strategy, pool, num_rounds=1).run_round(1, start, strategy.init_state(start))
    assert record.num_results == 0 and parameters == start
    assert "does not know algorithm 'fedfuture'" in record.failures[0]["reason"]


def test_a_registered_algorithm_is_known_by_name_and_its_extras_are_accepted(monkeypatch):
    """register_algorithm adds an algorithm at run time: clients look it up by name, servers accept its
    extras from the network; a second algorithm under a taken name is refused."""
    import insitu.algorithms
    from insitu.protocols.plain import FIT, expect

    monkeypatch.setattr(insitu.algorithms, "ALGORITHMS", dict(ALGORITHMS))

    class Echo(LocalSGD):
        name = "echo_test"
        result_extras = ("echo_test_extra",)

    assert "echo_test_extra" not in expect(FIT).arrays
    register_algorithm(Echo)
    assert algorithm_for({ALGORITHM: "echo_test"}) is Echo
    assert "echo_test_extra" in expect(FIT).arrays and "echo_test_extra" in result_extras()

    class Impostor(LocalSGD):
        name = "echo_test"

    with pytest.raises(ValueError, match="already registered"):
        register_algorithm(Impostor)
