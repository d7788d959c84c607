"""Algorithms, defences and attacks wired through SimulationConfig: checks before training, small runs.

The long versions (MNIST, many rounds) live in experiments/; these keep the same shape on the
bundled digits set so the suite stays fast.
"""

from __future__ import annotations

import pytest

from insitu.simulation import SimulationConfig, build_experiment, run_simulation

FAST = dict(dataset="digits", model="mlp", num_clients=10, partition="iid", rounds=5, local_epochs=2,
            batch_size=32, lr=0.1, momentum=0.9, seed=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(aggregator="krum", byzantine_f=4), r"needs at least 11 updates per round, but each round samples 10"),
        (dict(aggregator="bulyan", byzantine_f=2), r"needs at least 11 updates per round"),
        (dict(aggregator="trimmed_mean", trim_fraction=0.5), r"0 <= beta < 0.5, got 0.5"),
        (dict(strategy="fedprox", mu=-0.1), r"mu >= 0"),
        (dict(attack="poison"), r"unknown attack 'poison'; choose one of none, sign_flip"),
        (dict(attack="sign_flip"), r"needs attack_fraction > 0"),
        (dict(attack="sign_flip", attack_fraction=1.0), r"\[0, 1\)"),
        (dict(aggregator="average"), r"unknown aggregator 'average'; choose one of mean, median"),
        (dict(strategy="fedadam", server_lr=-1.0), r"server learning rate must be a finite number > 0"),
        (dict(lr_schedule="linear"), r"unknown lr_schedule 'linear'"),
        (dict(server_optimizer="adamw"), r"unknown server_optimizer 'adamw'"),
        (dict(eval_every=0), r"eval_every must be >= 1"),
    ],
)
def test_impossible_settings_fail_before_any_data_is_loaded(settings, message):
    config = SimulationConfig(**{**FAST, **settings, "data_dir": "/nonexistent"})
    with pytest.raises(ValueError, match=message):
        config.validate()


@pytest.mark.parametrize("name", ["fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_each_named_strategy_trains_and_is_deterministic(name):
    config = SimulationConfig(**{**FAST, "strategy": name, "rounds": 2, "local_epochs": 1, "momentum": 0.0,
                                 "server_lr": 0.01 if name in ("fedadam", "fedyogi", "fedadagrad") else 0.0})
    _, first = run_simulation(config)
    _, second = run_simulation(config)
    assert first.history.failed_rounds == [] and first.history.final_accuracy > first.history.initial.accuracy + 0.05
    assert first.parameters == second.parameters


def test_sign_flipping_breaks_the_mean_but_not_the_robust_aggregators():
    clean = run_simulation(SimulationConfig(**FAST))[1].history.final_accuracy
    attacked = dict(attack="sign_flip", attack_fraction=0.2, attack_scale=10.0, byzantine_f=2, trim_fraction=0.2)
    experiment, result = run_simulation(SimulationConfig(**FAST, **attacked))
    assert len(experiment.malicious) == 2
    assert clean > 0.85 and result.history.final_accuracy < 0.5
    for aggregator in ("median", "trimmed_mean", "multi_krum"):
        robust = run_simulation(SimulationConfig(**FAST, **attacked, aggregator=aggregator))[1].history.final_accuracy
        assert robust > clean - 0.1, aggregator


def test_backdoor_reports_its_success_rate_and_data_attacks_copy_only_the_attackers_rows():
    config = SimulationConfig(**{**FAST, "rounds": 2, "attack": "backdoor", "attack_fraction": 0.2})
    experiment = build_experiment(config)
    assert len(experiment.malicious) == 2
    _, result = run_simulation(config)
    metrics = result.history.rounds[-1].centralized.metrics
    assert 0.0 <= metrics["attack_success_rate"] <= 1.0
    flipped = SimulationConfig(**{**FAST, "rounds": 1, "attack": "label_flip", "attack_fraction": 0.2})
    assert run_simulation(flipped)[1].history.failed_rounds == []


def test_eval_every_and_stop_at_accuracy():
    _, result = run_simulation(SimulationConfig(**{**FAST, "rounds": 5, "eval_every": 2}))
    assert [r.round for r in result.history.rounds if r.centralized] == [2, 4, 5]
    _, stopped = run_simulation(SimulationConfig(**{**FAST, "rounds": 20, "stop_at_accuracy": 0.8}))
    assert len(stopped.history.rounds) < 20 and stopped.history.final_accuracy >= 0.8


def test_krum_with_too_few_results_fails_the_round_with_the_assumption_broken():
    config = SimulationConfig(**{**FAST, "rounds": 1, "aggregator": "krum", "byzantine_f": 3})
    experiment = build_experiment(config)
    experiment.strategy.fraction_fit = 0.5  # 5 updates, krum(f=3) needs 9
    from insitu.simulation import simulate

    result = simulate(experiment.client_fn, num_clients=10, strategy=experiment.strategy, num_rounds=1,
                      initial_parameters=experiment.initial_parameters)
    record = result.history.rounds[0]
    assert record.status == "failed" and "krum(f=3) needs n > 2f + 2 = 8 updates, got 5" in record.error
