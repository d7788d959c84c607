"""A million simulated clients: the lazy synthetic(alpha, beta) dataset, O(k) sampling, lazy client ids,
and a short 1,000,000-client run through build_experiment / Experiment.run and the CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from insitu.data.synthetic import NUM_CLASSES, NUM_FEATURES, LazyParts, SyntheticFederation
from insitu.engines.inprocess import ClientIds, InProcessPool
from insitu.privacy.randomness import OSEntropy, SimulationSeed
from insitu.simulation import SimulationConfig, build_experiment
from insitu.strategies import fedavg
from insitu.strategies.strategy import _floyd, _sample

# -- the synthetic generator -------------------------------------------------------------------


def test_client_shapes_labels_and_sizes():
    fed = SyntheticFederation(1000, alpha=1.0, beta=1.0, seed=3)
    for k in (0, 17, 999):
        x, y, xt, yt = fed.client_arrays(k)
        n = fed.client_size(k)
        assert x.shape == (n, NUM_FEATURES) and y.shape == (n,) and x.dtype == np.float32 and y.dtype == np.int64
        assert xt.shape == (max(1, n // 9), NUM_FEATURES) and yt.shape == (max(1, n // 9),)
        assert 50 <= n <= 1000
        assert y.min() >= 0 and y.max() < NUM_CLASSES
    with pytest.raises(IndexError, match="out of range"):
        fed.client_arrays(1000)


def test_sizes_follow_lognormal_4_2_plus_50():
    fed = SyntheticFederation(10**6, max_examples=0)
    sizes = np.array([fed.client_size(k) for k in range(4000)])
    assert sizes.min() >= 50
    # floor(LogNormal(4, 2)) + 50: median floor(e^4) + 50 = 104; P(size <= 50 + floor(e^2)) = P(Z <= -1) = 0.159
    assert 96 <= np.median(sizes) <= 112
    assert abs(np.mean(sizes <= 50 + 7) - 0.1587) < 0.02
    capped = SyntheticFederation(10**6, max_examples=200)
    assert max(capped.client_size(k) for k in range(2000)) == 200


def test_a_clients_data_is_the_same_every_time_and_depends_on_seed_and_client():
    fed = SyntheticFederation(10**6, seed=5)
    first = fed.client_arrays(123_456)
    fed.client_arrays(7)  # other draws in between change nothing
    again = SyntheticFederation(10**6, seed=5).client_arrays(123_456)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    other_client = fed.client_arrays(123_457)[0]
    other_seed = SyntheticFederation(10**6, seed=6).client_arrays(123_456)[0]
    assert not np.array_equal(first[0][:50], other_client[:50])
    assert not np.array_equal(first[0][:50], other_seed[:50])
    # the population size does not enter a client's stream: client 3 of 10 is client 3 of 10**6
    np.testing.assert_array_equal(SyntheticFederation(10, seed=5).client_arrays(3)[0], fed.client_arrays(3)[0])


def test_feature_covariance_is_diagonal_j_to_the_minus_1_2():
    fed = SyntheticFederation(10, alpha=0.0, beta=0.0, max_examples=0)
    x = np.concatenate([fed.client_arrays(k)[0] for k in range(10)])
    big = next(k for k in range(10_000) if SyntheticFederation(10_000, max_examples=0).client_size(k) > 5000)
    xb = SyntheticFederation(10_000, alpha=0.0, beta=0.0, max_examples=0).client_arrays(big)[0]
    variances = xb.var(axis=0)
    expected = np.arange(1, NUM_FEATURES + 1) ** -1.2
    np.testing.assert_allclose(variances, expected, rtol=0.15)
    assert x.shape[1] == NUM_FEATURES


def _label_shares(fed: SyntheticFederation, clients: range) -> np.ndarray:
    return np.stack([np.bincount(fed.client_arrays(k)[1], minlength=NUM_CLASSES) / fed.client_size(k)
                     for k in clients])


def test_alpha_and_beta_raise_heterogeneity():
    # beta moves each client's feature mean: the spread of client means grows with beta
    def spread_of_means(beta: float) -> float:
        fed = SyntheticFederation(100, alpha=0.0, beta=beta, seed=1)
        return float(np.std([fed.client_arrays(k)[0].mean() for k in range(40)]))

    assert spread_of_means(5.0) > 2.0 * spread_of_means(0.0)
    # every client has its own model W_k ~ N(u_k, 1), so even synthetic(0, 0) is non-IID in its labels:
    # client label shares differ from the pooled shares (mean L1 distance well above sampling noise)
    shares = _label_shares(SyntheticFederation(100, alpha=0.0, beta=0.0, seed=1), range(40))
    assert float(np.abs(shares - shares.mean(axis=0)).sum(axis=1).mean()) > 0.5
    # alpha, as defined (u_k is the mean of every entry of W_k and b_k), adds u_k (sum(x) + 1) to every logit
    # of a client alike: the argmax, hence every label, is the same for any alpha (same seed, same draws)
    for k in range(20):
        low = SyntheticFederation(100, alpha=0.0, seed=1).client_arrays(k)
        high = SyntheticFederation(100, alpha=10.0, seed=1).client_arrays(k)
        np.testing.assert_array_equal(low[0], high[0])
        assert np.mean(low[1] == high[1]) > 0.99  # float rounding may flip a near tie, nothing more
    with pytest.raises(ValueError, match="alpha and beta must be >= 0"):
        SyntheticFederation(10, alpha=-1.0)
    with pytest.raises(ValueError, match="max_examples must be >= 50"):
        SyntheticFederation(10, max_examples=10)


def test_central_test_set_is_bounded_and_from_a_fixed_sample_of_clients():
    fed = SyntheticFederation(10**6, seed=2, max_examples=300)
    clients = fed.test_clients(50)
    assert clients == sorted(set(clients)) and len(clients) == 50 and clients[-1] < 10**6
    assert clients == SyntheticFederation(10**6, seed=2).test_clients(50)
    test = fed.test_set(50)
    assert len(test) == sum(max(1, fed.client_size(k) // 9) for k in clients) <= 50 * 300 // 9
    np.testing.assert_array_equal(test.x[:3].numpy(), fed.client_arrays(clients[0])[2][:3])


def test_lazy_parts_build_nothing_up_front():
    parts = LazyParts(SyntheticFederation(10**6, seed=0))
    assert len(parts) == 10**6
    np.testing.assert_array_equal(parts[999_999], np.arange(SyntheticFederation(10**6).client_size(999_999)))
    assert len(parts[-1]) == len(parts[999_999])
    with pytest.raises(IndexError):
        parts[10**6]


# -- O(k) sampling and lazy ids ----------------------------------------------------------------


def test_client_ids_are_lazy_and_behave_like_the_list():
    ids = ClientIds(10**9)
    assert len(ids) == 10**9 and ids[0] == "0" and ids[-1] == "999999999" and ids[123] == "123"
    assert "999999999" in ids and "1000000000" not in ids and "07" not in ids and 7 not in ids
    assert ids.index("42") == 42
    small = ClientIds(5)
    assert list(small) == ["0", "1", "2", "3", "4"] == small and small[1:3] == ["1", "2"]
    with pytest.raises(IndexError):
        small[5]
    pool = InProcessPool(lambda cid: None, 10**9)  # type: ignore[arg-type,return-value]
    assert pool.wait_for(10) is pool.client_ids  # the same object every round: nothing copied


def test_sampling_10_of_a_billion_is_instant_distinct_and_in_range():
    strategy = fedavg(fraction_fit=1e-8, min_fit_clients=1, min_available_clients=1)
    ids = ClientIds(10**9)
    started = time.perf_counter()
    chosen = strategy.sample_fit(ids, SimulationSeed(0).generator(1, "sampling"))
    secure = _sample(ids, 10, OSEntropy().generator(1, "sampling"))
    assert time.perf_counter() - started < 0.5  # a full draw over 10**9 ids would take minutes and 8 GB
    for picked in (chosen, secure):
        assert len(picked) == 10 and len(set(picked)) == 10
        assert all(0 <= int(c) < 10**9 for c in picked) and [int(c) for c in picked] == sorted(int(c) for c in picked)


def test_seeded_sample_is_unchanged_numpy_choice():
    # the documented draw: numpy's choice(N, k, replace=False) (Floyd's algorithm for k <= N / 50)
    ids = ClientIds(1000)
    expected = sorted(np.random.default_rng(11).choice(1000, size=7, replace=False))
    assert _sample(ids, 7, np.random.default_rng(11)) == [str(i) for i in expected]
    assert _sample(ids, 1000, np.random.default_rng(11)) == list(ids)


@pytest.mark.parametrize("source", ["numpy", "floyd"])
def test_samples_are_uniform(source):
    # 3 of 12, 6000 draws: every client is expected 1500 times; chi-square with 11 dof, p = 0.001 at 31.3
    n, k, draws = 12, 3, 6000
    rng = np.random.default_rng(2024)
    counts = np.zeros(n)
    for _ in range(draws):
        picked = rng.choice(n, size=k, replace=False) if source == "numpy" else _floyd(n, k, rng.random(k))
        assert len({int(i) for i in picked}) == k
        counts[list(picked)] += 1
    expected = draws * k / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 31.3, counts


def test_floyd_covers_every_subset_equally():
    # all C(5, 2) = 10 pairs, 20000 draws: each pair expected 2000 times (chi-square, 9 dof, p = 0.001 at 27.9)
    rng = np.random.default_rng(7)
    seen: dict[tuple[int, ...], int] = {}
    for _ in range(20000):
        pair = tuple(sorted(_floyd(5, 2, rng.random(2))))
        seen[pair] = seen.get(pair, 0) + 1
    assert len(seen) == 10
    chi2 = sum((c - 2000) ** 2 / 2000 for c in seen.values())
    assert chi2 < 27.9, seen


# -- a million clients end to end ----------------------------------------------------------------


def _million(**overrides: object) -> SimulationConfig:
    values: dict[str, object] = {"dataset": "synthetic", "num_clients": 1_000_000, "fraction_fit": 0.0001, "rounds": 2,
                                     "model": "logreg", "local_epochs": 1, "batch_size": 0, "synthetic_max_examples": 200,
                                     "synthetic_test_clients": 20, "seed": 4}
    values.update(overrides)
    return SimulationConfig(**values)  # type: ignore[arg-type]


def test_a_million_clients_run_two_rounds_of_100():
    experiment = build_experiment(_million())
    assert len(experiment.train) == 0 and len(experiment.train_parts) == 1_000_000
    assert isinstance(experiment.engine().client_ids, ClientIds)
    result = experiment.run()
    rounds = result.history.rounds
    assert len(rounds) == 2 and all(r.status != "failed" for r in rounds)
    assert all(len(r.selected) == 100 == r.num_results for r in rounds)
    assert all(0 <= int(c) < 1_000_000 for r in rounds for c in r.selected)
    assert set(rounds[0].selected) != set(rounds[1].selected)
    assert rounds[-1].centralized is not None and 0.0 <= rounds[-1].centralized.metrics["accuracy"] <= 1.0
    again = build_experiment(_million()).run()  # same seed, same clients, same bits
    assert [r.selected for r in again.history.rounds] == [r.selected for r in rounds]
    np.testing.assert_array_equal(again.parameters.flat(), result.parameters.flat())


def test_synthetic_with_local_evaluation_and_systems_model():
    experiment = build_experiment(_million(num_clients=1000, fraction_fit=0.01, fraction_evaluate=0.005,
                                           speed_sigma=0.5, rounds=1))
    record = experiment.run().history.rounds[0]
    assert record.federated is not None and record.federated.num_examples > 0
    assert record.timings["clock_s"] > 0  # simulated seconds from the clients' generated sizes


def test_synthetic_refuses_data_attacks():
    with pytest.raises(ValueError, match="generates each client's data"):
        _million(attack="label_flip", attack_fraction=0.1).validate()


def test_cli_runs_a_million_synthetic_clients(tmp_path):
    from typer.testing import CliRunner

    from insitu.cli.main import app

    result = CliRunner().invoke(app, ["simulate", "--dataset", "synthetic", "--clients", "1000000", "--fraction",
                                      "0.0001", "--rounds", "1", "--model", "logreg", "--synthetic-max-examples", "100",
                                      "--synthetic-test-clients", "10", "--synthetic-alpha", "0.5",
                                      "--synthetic-beta", "0.5", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "generated per client" in result.output
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dataset"] == "synthetic" and config["num_clients"] == 1_000_000
    assert config["synthetic_alpha"] == 0.5 and config["synthetic_beta"] == 0.5
