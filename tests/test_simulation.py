"""Whole simulations on small data: determinism, presets, input errors before training."""

import numpy as np
import pytest

from insitu.data import PartitionError
from insitu.simulation import SimulationConfig, build_experiment, run_simulation

SMALL = dict(dataset="digits", model="mlp", num_clients=5, rounds=2, local_epochs=1, lr=0.1, fraction_fit=0.6, min_fit_clients=1)


def test_same_seed_gives_bit_identical_parameters():
    _, a = run_simulation(SimulationConfig(**SMALL, seed=3))
    _, b = run_simulation(SimulationConfig(**SMALL, seed=3))
    _, c = run_simulation(SimulationConfig(**SMALL, seed=4))
    assert all(np.array_equal(x, y) for x, y in zip(a.parameters.arrays, b.parameters.arrays))
    assert a.parameters != c.parameters
    assert [r.selected for r in a.history.rounds] == [r.selected for r in b.history.rounds]


def test_mnist_seed_determinism_with_the_cnn(mnist_dir):
    cfg = dict(dataset="mnist", data_dir=str(mnist_dir), model="simple-cnn", num_clients=4, rounds=1,
               train_limit=800, test_limit=200, partition="dirichlet", alpha=0.5, seed=1)
    _, a = run_simulation(SimulationConfig(**cfg))
    _, b = run_simulation(SimulationConfig(**cfg))
    assert a.parameters == b.parameters


def test_learns_digits_and_federated_evaluation_is_recorded():
    cfg = SimulationConfig(dataset="digits", model="mlp", num_clients=5, rounds=3, local_epochs=3, lr=0.1,
                           momentum=0.9, fraction_evaluate=1.0)
    _, result = run_simulation(cfg)
    last = result.history.rounds[-1]
    assert last.centralized.accuracy > 0.85
    assert last.federated is not None and last.federated.num_examples == 359
    assert result.history.initial.accuracy < 0.3


@pytest.mark.parametrize(
    "changes, error, message",
    [
        (dict(num_clients=2000), PartitionError, "more clients"),
        (dict(partition="dirichlet", alpha=0.0), ValueError, "alpha must be > 0"),
        (dict(partition="dirichlet", alpha=-1.0), ValueError, "alpha must be > 0"),
        (dict(partition="zipf"), ValueError, "choose one of iid, dirichlet, shards, quantity"),
        (dict(model="resnet"), ValueError, "choose one of simple-cnn, 2nn, logreg, mlp"),
        (dict(dataset="cifar"), ValueError, "digits"),
        (dict(strategy="fedfoo"), ValueError, "choose one of fedavg, fedsgd"),
        (dict(model="simple-cnn"), ValueError, "expects 1x28x28"),
    ],
)
def test_impossible_settings_fail_before_training(changes, error, message):
    with pytest.raises(error, match=message):
        build_experiment(SimulationConfig(**{**SMALL, **changes}))


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="unknown setting.*colour"):
        SimulationConfig.from_dict({"colour": "red"})


def test_virtual_clients_are_not_kept_alive_between_calls():
    import gc
    import weakref

    built, refs = [], []
    experiment = build_experiment(SimulationConfig(**{**SMALL, "num_clients": 1000, "fraction_fit": 0.01, "rounds": 2}))
    base_fn = experiment.client_fn

    def counting_fn(cid):
        built.append(cid)
        client = base_fn(cid)
        refs.append(weakref.ref(client))
        return client

    from insitu.simulation import simulate

    simulate(counting_fn, num_clients=1000, strategy=experiment.strategy, num_rounds=2,
             initial_parameters=experiment.initial_parameters, seed=0)
    assert len(built) == 20  # only the sampled clients were ever built
    gc.collect()
    assert all(ref() is None for ref in refs)
