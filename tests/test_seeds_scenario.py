"""The seeds' tutorial on full MNIST: 3 x 20,000 images, SimpleCNN, SGD lr 0.01, batch 32, 5 rounds.

Slow (about 5-9 minutes on 2 cores): run with ``python -m pytest -m slow``.
"""

import pytest

from insitu.cli.presets import resolve_config
from insitu.simulation import run_simulation


@pytest.mark.slow
def test_seeds_mnist_scenario_reaches_97_percent(mnist_dir):
    config = resolve_config(None, {"dataset": "mnist", "data_dir": str(mnist_dir)})
    assert (config.model, config.num_clients, config.lr, config.batch_size, config.rounds) == ("simple-cnn", 3, 0.01, 32, 5)
    experiment, result = run_simulation(config)
    assert [len(p) for p in experiment.train_parts] == [20000, 20000, 20000]
    assert result.history.final_accuracy >= 0.97
