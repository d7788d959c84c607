"""Distributed DP: Skellam math (hand-checked and against dp-accounting), client noise, the in-process secure round."""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from insitu.aggregation import pipeline, scale
from insitu.privacy import skellam
from insitu.privacy.distributed import DistributedDP, client_rng, distributed_input
from insitu.privacy.randomness import SimulationSeed
from insitu.privacy.secagg.simulate import run_round
from insitu.privacy.secure import SecureAggregation
from insitu.simulation import SimulationConfig, run_simulation
from insitu.strategies import fedavg


def gaussian_epsilon(noise_multiplier: float, q: float, rounds: int, delta: float, orders=skellam.ORDERS) -> float:
    """dp-accounting's RDP epsilon of the Poisson-sampled Gaussian, over the same orders."""
    accountant = rdp_privacy_accountant.RdpAccountant([float(a) for a in orders])
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    accountant.compose(event if q == 1 else dp_accounting.PoissonSampledDpEvent(q, event), rounds)
    return accountant.get_epsilon(delta)


# -- the formulas, by hand --------------------------------------------------------------------------

def test_skellam_rdp_hand_checked():
    # alpha 2, mu 100, D1 10, D2 5: 2*25/200 + min((3*25 + 60)/(4*100^2), 3*5/200) = 0.25 + 0.003375
    assert skellam.skellam_rdp(2, 100.0, 10.0, 5.0) == pytest.approx(0.253375, rel=1e-12)
    # small mu: the second branch 3 D2 / (2 mu) is the smaller: 3*1/(2*1) = 1.5 vs (3*1 + 6)/4 = 2.25
    assert skellam.skellam_rdp(2, 1.0, 1.0, 1.0) == pytest.approx(2 / 2 + 1.5, rel=1e-12)
    assert skellam.skellam_rdp(2, 0.0, 1.0, 1.0) == math.inf


def test_zhu_wang_amplification_hand_checked():
    rdp = float  # eps(a) = a
    q, alpha = 0.5, 3
    # (1-q)^2 (1 + 2q) + C(3,2) q^2 (1-q) e^eps(2) + 3 C(3,3) q^3 e^(2 eps(3))
    by_hand = math.log(0.25 * 2 + 3 * 0.25 * 0.5 * math.e**2 + 3 * 0.125 * math.e**6) / 2
    assert skellam.subsampled_rdp(q, rdp, alpha) == pytest.approx(by_hand, rel=1e-12)
    assert skellam.subsampled_rdp(1.0, rdp, 5) == 5.0 and skellam.subsampled_rdp(0.0, rdp, 5) == 0.0
    with pytest.raises(ValueError, match="integer order"):
        skellam.subsampled_rdp(0.1, rdp, 2.5)


def test_rounding_bound_and_sensitivities():
    # c = 3, d = 4, beta = e^-0.5: sqrt(9 + 1 + 1 * (3 + 1)) = sqrt(14)
    assert skellam.rounded_l2_bound(3.0, 4) == pytest.approx(math.sqrt(14), rel=1e-12)
    l1, l2 = skellam.sensitivities(3.0, 4)
    assert l2 == pytest.approx(math.sqrt(14)) and l1 == pytest.approx(min(2 * math.sqrt(14), 14))


# -- against dp-accounting: what is compared ---------------------------------------------------------

@pytest.mark.parametrize("z, rounds, scaled_norm, dim", [(1.0, 1, 2.0**16, 7850), (5.0, 10, 2.0**12, 100),
                                                         (0.8, 50, 2.0**20, 100_000), (2.0, 200, 2.0**14, 1000)])
def test_unsampled_epsilon_within_one_percent_of_dp_accounting_gaussian(z, rounds, scaled_norm, dim):
    """q = 1: our Skellam epsilon is the Gaussian one plus the discreteness terms, never below it."""
    l1, l2 = skellam.sensitivities(scaled_norm, dim)
    mu = (z * l2) ** 2
    ours = skellam.epsilon(rounds * skellam.round_rdp(mu, 1.0, l1, l2), 1e-5)
    reference = gaussian_epsilon(math.sqrt(mu) / l2, 1.0, rounds, 1e-5)
    assert reference <= ours <= 1.01 * reference


def direct_zhu_wang(q: float, alpha: int, mu: float, l1: float, l2: float) -> float:
    """An independent, direct evaluation of Zhu-Wang Thm 6 with the Skellam RDP: exact binomials, 50-digit decimals."""
    getcontext().prec = 50
    q_, mu_, l1_, l2_ = Decimal(q), Decimal(mu), Decimal(l1), Decimal(l2)

    def eps(a: int) -> Decimal:
        return a * l2_**2 / (2 * mu_) + min(((2 * a - 1) * l2_**2 + 6 * l1_) / (4 * mu_**2), 3 * l2_ / (2 * mu_))

    total = (1 - q_) ** (alpha - 1) * (1 + (alpha - 1) * q_)
    total += math.comb(alpha, 2) * q_**2 * (1 - q_) ** (alpha - 2) * eps(2).exp()
    total += sum(3 * math.comb(alpha, j) * q_**j * (1 - q_) ** (alpha - j) * ((j - 1) * eps(j)).exp()
                 for j in range(3, alpha + 1))
    return float(total.ln() / (alpha - 1))


@pytest.mark.parametrize("q, z, rounds", [(0.05, 1.5, 55), (0.1, 2.0, 100), (0.01, 1.0, 1000)])
def test_sampled_epsilon_is_the_formula_and_an_upper_bound_of_the_sampled_gaussian(q, z, rounds):
    l1, l2 = skellam.sensitivities(2.0**20, 7850)
    mu = (z * l2) ** 2
    rdp = skellam.round_rdp(mu, q, l1, l2)
    direct = np.array([direct_zhu_wang(q, a, mu, l1, l2) for a in skellam.ORDERS])
    assert np.allclose(rdp, direct, rtol=1e-9)
    ours = skellam.epsilon(rounds * rdp, 1e-5)
    assert ours >= gaussian_epsilon(z, q, rounds, 1e-5)  # the general bound is looser (see docs), never tighter


# -- client noise ------------------------------------------------------------------------------------

def test_skellam_shares_add_up_to_the_planned_variance():
    rng = np.random.default_rng(0)
    shares = sum(skellam.skellam_noise(250.0, 200_000, rng) for _ in range(4))
    assert shares.dtype == np.int64
    assert abs(shares.mean()) < 0.2 and shares.var() == pytest.approx(1000.0, rel=0.02)


def test_conditional_rounding_meets_its_bound_and_is_unbiased():
    rng = np.random.default_rng(1)
    x = rng.normal(size=500)
    x *= 20.0 / np.linalg.norm(x)
    bound = skellam.rounded_l2_bound(20.0, 500)
    draws = np.array([skellam.conditional_rounding(x, bound, rng) for _ in range(400)])
    assert (np.linalg.norm(draws, axis=1) <= bound).all()
    assert np.abs(draws.mean(axis=0) - x).max() < 0.2
    with pytest.raises(ValueError, match="did not meet"):
        skellam.conditional_rounding(x * 10, bound, rng, max_tries=3)


def test_a_client_input_is_clipped_scaled_rounded_and_noised():
    delta = np.full(100, 1.0)  # norm 10, clipped to 1
    got = distributed_input(delta, clip_norm=1.0, gamma=1000.0, client_variance=400.0, rng=np.random.default_rng(2))
    assert got.dtype == np.int64 and got.size == 101 and got[-1] == 0
    assert abs(got[:-1].mean() - 100.0) < 6 and got[:-1].std() == pytest.approx(20.0, rel=0.25)
    with pytest.raises(ValueError, match="must add noise"):
        distributed_input(delta, clip_norm=1.0, gamma=1000.0, client_variance=0.0, rng=np.random.default_rng(2))


# -- the in-process secure round: the server never has the unnoised sum --------------------------------

def test_the_server_decodes_only_the_noised_sum_in_simulation(monkeypatch):
    from insitu.privacy import secure

    rounds = []
    monkeypatch.setattr(secure, "run_round", lambda *args, **kwargs: rounds.append(run_round(*args, **kwargs))
                        or rounds[-1])
    dp = DistributedDP(1.0, 1.0, 0.5, randomness=SimulationSeed(7))
    settings = SecureAggregation(seed=3, dropout_fraction=0.2)
    plan = dp.plan(dp.init_state(), 10, 300)
    reducer = pipeline(reduce=settings.distributed_sum(plan), post=[scale(1 / plan.denominator)])
    rng = np.random.default_rng(4)
    updates = [rng.normal(size=300) * s for s in (0.01, 0.05, 0.2, 1.0, 3.0)]
    acc = reducer.start(300)
    for update in updates:
        acc = reducer.add(acc, update, 1.0)
    mean, report = reducer.finish(acc)
    [protocol] = rounds
    server = protocol.server
    assert len(protocol.included) == 5 and report["contributors"] == 5  # dropping after the masked input still counts
    # what the clients computed, regenerated from the simulation seed: rounded clipped updates + noise
    inputs = [distributed_input(u, clip_norm=1.0, gamma=plan.gamma, client_variance=plan.client_variance,
                                rng=client_rng(7, plan.round_index, i + 1)) for i, u in enumerate(updates)]
    assert np.array_equal(server.result, np.sum(inputs, axis=0))  # exact: mod 2**32 arithmetic, no wrap
    clipped = sum(u * min(1.0, 1.0 / np.linalg.norm(u)) for u in updates) * plan.gamma
    noise = server.result[:-1] - clipped
    # the server's total is the clipped sum plus the clients' noise, whose variance is 5 shares of mu/m
    assert noise.std() == pytest.approx(math.sqrt(5 * plan.client_variance), rel=0.15)
    assert server.result[-1] == 0
    assert np.allclose(mean, server.result[:-1] / (plan.gamma * plan.denominator))


def test_dropouts_below_the_planned_contributors_are_charged_conservatively():
    dp = DistributedDP(1.2, 1.0, 0.05, min_contributors=40)
    state = dp.init_state()
    plan = dp.plan(state, 1000, 7850)
    full = dp.after_round(state, plan, contributors=52)
    short = dp.after_round(state, plan, contributors=30)
    assert full["history"][0, 0] == pytest.approx(plan.mu)  # k >= m: the planned variance, no more
    assert short["history"][0, 0] == pytest.approx(plan.mu * 30 / 40)  # k < m: only the shares that were added
    assert dp.epsilon(short) > dp.epsilon(full)
    expected = skellam.epsilon(skellam.round_rdp(plan.mu * 0.75, 0.05, plan.l1, plan.l2), 1e-5)
    assert dp.epsilon(short) == pytest.approx(expected, rel=1e-12)
    # against the server (who knows who took part) there is no amplification
    assert dp.epsilon_against_server(full, 1) == pytest.approx(
        skellam.epsilon(skellam.round_rdp(plan.mu, 1.0, plan.l1, plan.l2), 1e-5))
    assert dp.epsilon_against_server(full, 1) > 3 * dp.epsilon(full)


def test_distributed_dp_in_the_round_loop_stops_at_its_budget():
    config = SimulationConfig(dataset="digits", model="logreg", num_clients=20, rounds=6, lr=0.1, seed=0,
                              fraction_fit=0.5, secure_aggregation=True, dp_clip=1.0, dp_noise=1.0,
                              dp_mode="distributed", dp_target_epsilon=8.0, dp_record_client_metrics=True)
    experiment, result = run_simulation(config)
    ok = [r for r in result.history.rounds if r.status == "ok"]
    assert len(ok) == 3 and all(r.fit_metrics["epsilon"] <= 8.0 for r in ok)
    assert result.history.stopped and "privacy budget" in result.history.stopped
    assert experiment.strategy.privacy.epsilon(result.server_state.privacy) == pytest.approx(ok[-1].fit_metrics["epsilon"])


def test_incompatible_settings_are_refused():
    with pytest.raises(ValueError, match="needs secure_aggregation"):
        fedavg(privacy=DistributedDP(1.0, 1.0, 0.1))
    base = {"dataset": "digits", "num_clients": 10, "dp_clip": 1.0, "dp_mode": "distributed"}
    with pytest.raises(ValueError, match="secure_aggregation = true"):
        SimulationConfig(**base).validate()
    with pytest.raises(ValueError, match="drop dp_adaptive_clip"):
        SimulationConfig(**base, secure_aggregation=True, dp_adaptive_clip=True).validate()
    with pytest.raises(ValueError, match="unknown dp_mode"):
        SimulationConfig(dataset="digits", dp_mode="local").validate()
    with pytest.raises(ValueError, match="needs noise"):
        DistributedDP(0.0, 1.0, 0.1)


def test_large_variances_are_drawn_in_parts_that_keep_the_sampler_exact():
    rng = np.random.default_rng(3)
    variance = 2.0**40  # Poisson means of 2**39: drawn as 8 parts of 2**36 each
    draws = skellam.skellam_noise(variance, 100_000, rng).astype(np.float64)
    assert draws.std() == pytest.approx(math.sqrt(variance), rel=0.01)
    with pytest.raises(ValueError, match="lower the scale gamma"):
        skellam.skellam_noise(2.0**45, 10, rng)


def test_a_malicious_client_that_skips_its_noise_share_leaves_only_the_honest_noise():
    """The documented limit: nothing proves a client noised its input; the sum then carries less noise."""
    from insitu.privacy.secagg import SecAggConfig, run_round

    gamma, variance, dim = 1024.0, 1e6, 2000
    rng = np.random.default_rng(8)
    updates = [rng.normal(size=dim) * 0.01 for _ in range(5)]
    honest = {c: distributed_input(updates[c - 1], clip_norm=1.0, gamma=gamma, client_variance=variance,
                                   rng=np.random.default_rng(c)) for c in range(1, 5)}
    cheat = np.append(np.rint(updates[4] * gamma).astype(np.int64), 0)  # rounded, clipped, but no noise
    report = run_round(SecAggConfig(5, 3, dim + 1, 1.0, integer=True), {**honest, 5: cheat})
    signal = gamma * np.sum([u * min(1.0, 1.0 / np.linalg.norm(u)) for u in updates], axis=0)
    noise = report.total[:-1] - signal
    assert noise.std() == pytest.approx(math.sqrt(4 * variance), rel=0.05)  # four shares, not the five planned


def test_a_decoded_sum_refused_by_the_aggregate_check_is_charged_as_computed(monkeypatch):
    """k < m contributors, then the aggregate is refused: the server still decoded a sum of variance
    k mu / m, so that (not the planned mu, the cheaper charge) is what the accountant records."""
    from insitu.run import loop

    monkeypatch.setattr(loop, "check_aggregate", lambda parameters, bound: "refused for the test")
    config = SimulationConfig(dataset="digits", model="logreg", num_clients=20, rounds=1, lr=0.1, seed=0,
                              fraction_fit=0.5, secure_aggregation=True, dp_clip=1.0, dp_noise=1.0,
                              dp_mode="distributed", dp_min_contributors=50, dp_record_client_metrics=True)
    experiment, result = run_simulation(config)
    [record] = result.history.rounds
    assert record.status == "failed" and "refused for the test" in record.error
    dp = experiment.strategy.privacy
    [row] = result.server_state.privacy["history"]
    contributors = len(record.clients)
    assert 2 <= contributors < 50
    plan = dp.plan(dp.init_state(), 20, experiment.initial_parameters.num_values)  # a pure function: the same plan
    assert row[0] == pytest.approx(plan.mu * contributors / 50)  # as computed: fewer shares than planned
    assert row[0] < plan.mu


def test_a_round_that_fails_before_its_plan_is_charged_all_the_same():
    """First round (or first after a resume, on a fresh instance): the round is counted at this round's
    planned noise, exactly as an instance that had planned it would count it (plans are not remembered)."""
    planned = DistributedDP(1.0, 1.0, 0.1, min_contributors=5)
    state = planned.init_state()
    plan = planned.plan(state, 100, 1000)
    expected = planned.after_failed_round(state, 100, 1000)
    fresh = DistributedDP(1.0, 1.0, 0.1, min_contributors=5)  # as after a restart: nothing planned
    charged = fresh.after_failed_round(state, 100, 1000)
    assert len(charged["history"]) == 1 and charged["history"][0, 0] == pytest.approx(plan.mu)
    assert fresh.epsilon(charged) == pytest.approx(planned.epsilon(expected), rel=1e-12) and fresh.epsilon(charged) > 0
    # a stale plan from the previous round is not reused for the next one
    again = fresh.after_failed_round(charged, 100, 1000)
    assert again["history"][:, 4].sum() == 2  # two rounds counted
    assert fresh.epsilon(again) > fresh.epsilon(charged)
