"""Secure aggregation inside the round loop (simulation): same model as plain FedAvg, DP composes."""

from __future__ import annotations

import numpy as np
import pytest

from insitu.client.api import FitResult
from insitu.params import Parameters
from insitu.privacy.secure import SecureAggregation
from insitu.simulation import SimulationConfig, run_simulation
from insitu.strategies import fedavg

BASE = {"dataset": "digits", "model": "logreg", "num_clients": 8, "rounds": 2, "lr": 0.1, "seed": 0}


def test_secure_fedavg_gives_the_plain_model_even_with_30_percent_dropouts(monkeypatch):
    from insitu.privacy import secure as secure_module
    from insitu.privacy.secagg.simulate import run_round

    reports = []
    monkeypatch.setattr(secure_module, "run_round", lambda *a, **k: reports.append(run_round(*a, **k)) or reports[-1])
    _, plain = run_simulation(SimulationConfig(**BASE))
    _, secure = run_simulation(SimulationConfig(**BASE, secure_aggregation=True, secagg_dropout=0.3))
    # fixed point (scale ~ 2^31 / (n B)) loses < 1e-6 per value; nothing else differs
    assert np.abs(plain.parameters.flat() - secure.parameters.flat()).max() < 1e-5
    assert len(reports) == 2 and all(len(r.included) == 8 and r.bytes_sent for r in reports)


def test_the_secure_sum_reports_what_reached_it():
    global_params = Parameters.from_arrays({"w": np.zeros(3, np.float32)})
    results = [(str(i), FitResult(Parameters.from_arrays({"w": np.full(3, float(i), np.float32)}), i)) for i in (1, 2, 3)]
    agg = fedavg(secure_aggregation=SecureAggregation(seed=0)).aggregate_fit(global_params, None, results)
    np.testing.assert_allclose(agg.parameters.flat(), np.full(3, 14 / 6), rtol=1e-6)  # (1 + 4 + 9) / 6
    assert agg.report["contributors"] == 3 and agg.report["secagg_bytes_sent"] > 0
    assert agg.report["secagg_clipped_values"] == 0


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
