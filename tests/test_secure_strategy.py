"""Secure aggregation inside the round loop (simulation): same model as plain FedAvg, DP composes."""

from __future__ import annotations

import numpy as np
import pytest

from insitu.privacy.secure import SecureAggregation
from insitu.simulation import SimulationConfig, run_simulation

BASE = dict(dataset="digits", model="logreg", num_clients=8, rounds=2, lr=0.1, seed=0)


def test_secure_fedavg_gives_the_plain_model_even_with_30_percent_dropouts():
    _, plain = run_simulation(SimulationConfig(**BASE))
    experiment, secure = run_simulation(SimulationConfig(**BASE, secure_aggregation=True, secagg_dropout=0.3))
    # fixed point (scale ~ 2^31 / (n B)) loses < 1e-6 per value; nothing else differs
    assert np.abs(plain.parameters.flat() - secure.parameters.flat()).max() < 1e-5
    report = experiment.strategy.secure_aggregation.last_report
    assert len(report.included) == 8 and report.bytes_sent


def test_secure_aggregation_composes_with_central_dp():
    config = SimulationConfig(**{**BASE, "rounds": 3}, secure_aggregation=True, dp_clip=1.0, dp_noise=0.5,
                              fraction_fit=0.5, dp_record_client_metrics=True)
    _, result = run_simulation(config)
    ok = [r for r in result.history.rounds if r.status == "ok"]
    assert ok and all(r.num_results >= 2 and r.fit_metrics["epsilon"] > 0 for r in ok)
    assert all("at least 2 updates" in r.error for r in result.history.rounds if r.status != "ok")


def test_settings_that_need_individual_updates_are_refused():
    with pytest.raises(ValueError, match="reveals only the sum"):
        SimulationConfig(**BASE, secure_aggregation=True, aggregator="median").validate()
    with pytest.raises(ValueError, match="must be in \\[0.5, 1\\)"):
        SecureAggregation(threshold_fraction=0.4)
