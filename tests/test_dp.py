"""Central DP: the RDP accountant against independent references, DP-FedAvg's mechanism, budgets."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants.analysis import rdp as opacus_rdp

from insitu.privacy.accountant import (
    RDPAccountant,
    calibrate_noise,
    compute_epsilon,
    rdp_sampled_gaussian,
)
from insitu.privacy.central import CentralDP, gaussian_mean
from insitu.privacy.randomness import SimulationSeed
from insitu.strategies import ServerState, fedavg

SETTINGS = [  # (q, z, steps, delta)
    (0.01, 1.1, 1000, 1e-5),
    (0.1, 1.0, 100, 1e-5),
    (0.05, 0.8, 500, 1e-6),
    (0.001, 2.0, 10_000, 1e-5),
    (0.1, 0.5, 50, 1e-5),
]


@pytest.mark.parametrize(("q", "z", "steps", "delta"), SETTINGS)
def test_epsilon_matches_dp_accounting_within_one_percent(q, z, steps, delta):
    reference = rdp_privacy_accountant.RdpAccountant()
    reference.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    ours = compute_epsilon(z, q, steps, delta)
    # dp-accounting drops a few fractional orders it cannot converge, so it is a little looser: <= 0.52% here
    assert reference.get_epsilon(delta) * 0.994 <= ours <= reference.get_epsilon(delta) * (1 + 1e-6)


@pytest.mark.parametrize(("q", "z", "steps", "delta"), SETTINGS)
def test_epsilon_matches_opacus_rdp_analysis(q, z, steps, delta):
    from insitu.privacy.accountant import DEFAULT_ORDERS

    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=list(DEFAULT_ORDERS))
    reference, _ = opacus_rdp.get_privacy_spent(orders=list(DEFAULT_ORDERS), rdp=rdp, delta=delta)
    assert compute_epsilon(z, q, steps, delta) == pytest.approx(reference, rel=1e-6)


def test_golden_epsilons_without_any_reference_installed():
    # pinned from the comparison above (Opacus' analysis agrees to 1e-6)
    assert compute_epsilon(1.1, 0.01, 1000, 1e-5) == pytest.approx(1.7118, abs=1e-4)
    assert compute_epsilon(1.0, 0.1, 100, 1e-5) == pytest.approx(7.8993, abs=1e-4)
    assert compute_epsilon(2.0, 0.001, 10_000, 1e-5) == pytest.approx(0.2013, abs=1e-4)


def test_full_batch_gaussian_has_the_closed_form_rdp():
    orders = (2.0, 8.0, 32.0)
    assert np.allclose(rdp_sampled_gaussian(1.0, 2.0, orders), [a / (2 * 4.0) for a in orders])
    assert np.all(rdp_sampled_gaussian(0.0, 1.0, orders) == 0)


def test_accountant_composes_merges_and_persists():
    acc = RDPAccountant()
    acc.step(1.0, 0.1, 10)
    acc.step(1.0, 0.1, 5)
    acc.step(2.0, 0.05, 3)
    assert acc.history == [(1.0, 0.1, 15), (2.0, 0.05, 3)] and acc.steps == 18
    again = RDPAccountant.from_state_arrays(acc.state_arrays())
    assert again.epsilon(1e-5) == acc.epsilon(1e-5)
    assert acc.epsilon_after(1.0, 0.1, 1, 1e-5) > acc.epsilon(1e-5)
    with pytest.raises(ValueError, match="delta"):
        acc.epsilon(0.0)


def test_calibrate_noise_hits_the_target():
    z = calibrate_noise(2.0, 1e-5, 0.05, 100)
    assert compute_epsilon(z, 0.05, 100, 1e-5) <= 2.0 < compute_epsilon(z * 0.99, 0.05, 100, 1e-5)
    with pytest.raises(ValueError, match="target epsilon must be > 0"):
        calibrate_noise(0.0, 1e-5, 0.05, 100)


def test_gaussian_mean_clips_sums_and_divides_by_the_expected_count():
    noiseless = gaussian_mean(clip_norm=1.0, noise_std=0.0, denominator=4.0)
    acc = noiseless.start(2)
    noiseless.add(acc, np.array([3.0, 4.0], np.float32), 1)  # norm 5 -> scaled to norm 1
    noiseless.add(acc, np.array([0.3, 0.4], np.float32), 100)  # below the bound; weights ignored
    released, report = noiseless.finish(acc)
    assert report == {"within_clip": 1}
    assert np.allclose(released, (np.array([0.6, 0.8]) + np.array([0.3, 0.4])) / 4.0)
    noisy = gaussian_mean(clip_norm=1.0, noise_std=2.0, denominator=1.0, rng=np.random.default_rng(0))
    acc = noisy.start(200_000)
    noisy.add(acc, np.zeros(200_000, np.float32), 1)
    assert np.std(noisy.finish(acc)[0]) == pytest.approx(2.0, rel=0.01)


def test_central_dp_refuses_settings_without_a_guarantee():
    with pytest.raises(ValueError, match="needs noise"):
        CentralDP(noise_multiplier=0.0, clip_norm=1.0, sample_rate=0.1, target_epsilon=2.0)
    with pytest.raises(ValueError, match="sample_rate"):
        CentralDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.0)
    with pytest.raises(ValueError, match="adaptive clipping with 10 clients"):
        CentralDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.1, adaptive=True).check_clients(10)


def test_budget_stops_before_the_round_that_would_exceed_it():
    dp = CentralDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.1, target_epsilon=3.0)
    state, rounds = dp.init_state(), 0
    while dp.stop_reason(state) is None:
        state = dp.after_round(state, 0, 100, contributors=10)
        rounds += 1
    assert dp.epsilon(state) <= 3.0 < compute_epsilon(1.0, 0.1, rounds + 1, 1e-5)
    assert "privacy budget reached" in dp.stop_reason(state)


def test_adaptive_clipping_moves_towards_the_target_quantile():
    dp = CentralDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.5, adaptive=True, randomness=SimulationSeed(0))
    state = dp.init_state()
    for _ in range(10):  # nobody is below the bound: it must grow
        state = dp.after_round(state, 0, 1000, contributors=500)
    assert state["clip_norm"][0] > math.exp(0.2 * 0.5 * 10) * 0.8
    for _ in range(30):  # everybody is below it: it must shrink
        state = dp.after_round(state, 500, 1000, contributors=500)
    assert state["clip_norm"][0] < 1.0


def test_dp_strategy_poisson_samples_reports_epsilon_and_persists_its_state():
    from insitu.client.api import FitResult
    from insitu.params import Parameters

    dp = CentralDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.3, randomness=SimulationSeed(1))
    strategy = fedavg(privacy=dp, min_fit_clients=1, min_available_clients=1)
    sizes = {len(strategy.sample_fit([str(i) for i in range(100)], np.random.default_rng(r))) for r in range(20)}
    assert len(sizes) > 3 and all(10 < s < 50 for s in sizes)  # Poisson: the count varies around 30
    g = Parameters.from_arrays({"w": np.zeros(3, np.float32)})
    state = strategy.init_state(g)
    result = FitResult(Parameters.from_arrays({"w": np.full(3, 10.0, np.float32)}), 5)
    out = strategy.aggregate_fit(g, state, [("0", result)], num_clients=10)
    assert out.metrics["epsilon"] == pytest.approx(compute_epsilon(1.0, 0.3, 1, 1e-5))
    restored = ServerState.from_arrays(out.server_state.to_arrays())
    assert dp.epsilon(restored.privacy) == out.metrics["epsilon"]


def test_dp_fedavg_simulation_stops_at_its_budget():
    from insitu.simulation import SimulationConfig, run_simulation

    config = SimulationConfig(dataset="digits", model="logreg", num_clients=20, fraction_fit=0.2, rounds=50,
                              lr=0.1, dp_clip=1.0, dp_noise=1.5, dp_target_epsilon=3.0)
    _, result = run_simulation(config)
    history = result.history
    assert history.stopped and "privacy budget reached" in history.stopped
    assert 1 < len(history.rounds) < 50 and history.rounds[-1].fit_metrics["epsilon"] <= 3.0
    with pytest.raises(ValueError, match="use aggregator 'mean'"):
        SimulationConfig(dp_clip=1.0, aggregator="median").validate()


def test_pld_accountant_is_tighter_and_drives_the_budget():
    from insitu.privacy.accountant import pld_epsilon

    rdp = compute_epsilon(1.5, 0.05, 114, 1e-5)
    pld = pld_epsilon([(1.5, 0.05, 114)], 1e-5)
    assert 0.8 * rdp < pld < rdp  # PLD is exact up to discretization; RDP's conversion is loose
    dp = CentralDP(noise_multiplier=1.5, clip_norm=1.0, sample_rate=0.05, target_epsilon=1.0, accountant_kind="pld")
    state = dp.init_state()
    for _ in range(3):
        state = dp.after_round(state, 0, 1000, contributors=50)
    assert dp.epsilon(state) == pytest.approx(pld_epsilon([(1.5, 0.05, 3)], 1e-5))
    with pytest.raises(ValueError, match="'rdp' or 'pld'"):
        CentralDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.1, accountant_kind="moments")


def test_dp_aggregation_without_the_federation_size_is_refused():
    from insitu.client.api import FitResult
    from insitu.params import Parameters

    strategy = fedavg(privacy=CentralDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.3))
    g = Parameters.from_arrays({"w": np.zeros(3, np.float32)})
    result = FitResult(Parameters.from_arrays({"w": np.ones(3, np.float32)}), 5)
    with pytest.raises(ValueError, match="pass num_clients"):
        strategy.aggregate_fit(g, None, [("0", result)])
