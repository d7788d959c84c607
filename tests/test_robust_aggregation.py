"""Byzantine-robust reducers and wrappers: golden values on tiny vectors, plus properties."""

import logging

import numpy as np
import pytest

from insitu.aggregation import (
    AGGREGATOR_NAMES,
    AggregationAssumptionError,
    EmptyAggregationError,
    bulyan,
    clip_by_norm,
    clipped,
    coordinate_median,
    krum,
    make_reducer,
    multi_krum,
    screened,
    trimmed_mean,
    weighted_mean,
)
from insitu.client.api import FitResult
from insitu.params import Parameters
from insitu.strategies import fedavg


def run_with_report(reducer, updates, weights=None):
    """Feed rows (copied, as a strategy would) with weights (default 1); the aggregate and the report."""
    updates = [np.asarray(u, dtype=np.float32) for u in updates]
    weights = weights if weights is not None else [1.0] * len(updates)
    acc = reducer.start(updates[0].size)
    for u, w in zip(updates, weights):
        acc = reducer.add(acc, u.copy(), w)
    return reducer.finish(acc)


def run(reducer, updates, weights=None):
    return run_with_report(reducer, updates, weights)[0]


def f32(values):
    return np.asarray(values, dtype=np.float32)


# -- golden values ------------------------------------------------------------------------------
def test_median_golden_odd_and_even():
    np.testing.assert_array_equal(run(coordinate_median(), [[1, 5], [3, 2], [2, 9]]), f32([2, 5]))
    even = [[1, 10], [2, 20], [3, 30], [100, -5]]
    np.testing.assert_array_equal(run(coordinate_median(), even), f32([2.5, 15]))


def test_trimmed_mean_golden():
    rows = [[1, -50], [100, 3], [2, 0], [4, 1], [3, 2]]
    # beta = 0.2, n = 5: k = 1 dropped per side -> mean of {2, 3, 4} and {0, 1, 2}
    np.testing.assert_allclose(run(trimmed_mean(0.2), rows), f32([3, 1]), rtol=0, atol=1e-6)
    # beta = 0.1, n = 5: k = floor(0.5) = 0 -> the plain mean
    np.testing.assert_allclose(run(trimmed_mean(0.1), rows), f32([22, -8.8]), rtol=1e-6)


# Krum with f = 1, n = 5 on 1-D values: scores sum the n - f - 2 = 2 smallest squared distances.
# values 100, 0, 1, 3, 7 -> scores 18058, 10, 5, 13, 52
KRUM_ROWS = [[100.0], [0.0], [1.0], [3.0], [7.0]]


def test_krum_golden():
    reducer = krum(1)
    out, report = run_with_report(reducer, KRUM_ROWS)
    np.testing.assert_array_equal(out, f32([1.0]))
    assert report == {"selected": [2]}


def test_krum_ties_go_to_lowest_index():
    # the four unit-square corners all score 2; the far point scores 343
    rows = [[1, 1], [0, 0], [1, 0], [0, 1], [10, 10]]
    reducer = krum(1)
    out, report = run_with_report(reducer, rows)
    np.testing.assert_array_equal(out, f32([1, 1]))
    assert report["selected"] == [0]


def test_multi_krum_golden():
    reducer = multi_krum(1)  # m = n - f = 4: every value but 100
    out, report = run_with_report(reducer, KRUM_ROWS)
    np.testing.assert_allclose(out, f32([2.75]), rtol=1e-7)
    assert report["selected"] == [1, 2, 3, 4]
    reducer = multi_krum(1, m=2)  # the two best scores: 1 (5) and 0 (10)
    out, report = run_with_report(reducer, KRUM_ROWS)
    np.testing.assert_allclose(out, f32([0.5]), rtol=1e-7)
    assert report["selected"] == [1, 2]


def test_bulyan_golden_with_n_equal_4f_plus_3():
    # f = 1, n = 7: Krum picks (on what remains) 3, 4, 1, then 0 (ties with 6 at 36; smaller
    # total distance to the rest), then 6 (no neighbours left to score: smallest total distance).
    # theta = 5, beta = 3: median of {3, 4, 1, 0, 6} is 3; nearest three are 3, 4, 1 -> 8/3.
    # The second coordinate is constant, so it changes no distance and must come out as 5.
    values = [0, 1, 3, 4, 6, 20, -100]
    reducer = bulyan(1)
    out, report = run_with_report(reducer, [[v, 5.0] for v in values])
    np.testing.assert_allclose(out, f32([8 / 3, 5.0]), rtol=1e-6)
    assert report["selected"] == [2, 3, 1, 0, 4]


def test_bulyan_with_f_zero_is_the_mean():
    rows = [[1.0, 2.0], [3.0, -1.0], [5.0, 8.0]]
    np.testing.assert_allclose(run(bulyan(0), rows), f32([3.0, 3.0]), rtol=1e-6)


# -- robustness properties ----------------------------------------------------------------------
def benign_and_attackers(n_benign, n_bad, dim=5, scale=1e30, seed=0):
    rng = np.random.default_rng(seed)
    benign = rng.uniform(-1, 1, size=(n_benign, dim)).astype(np.float32)
    signs = np.where(np.arange(n_bad) % 2 == 0, 1.0, -1.0)[:, None]
    bad = (signs * scale * np.ones((n_bad, dim))).astype(np.float32)
    rows = np.concatenate([bad[: n_bad // 2], benign, bad[n_bad // 2 :]])
    return rows, benign


@pytest.mark.parametrize("reducer", [coordinate_median(), trimmed_mean(0.3)], ids=repr)
def test_coordinate_rules_ignore_a_minority_of_huge_outliers(reducer):
    rows, benign = benign_and_attackers(n_benign=7, n_bad=3)
    out = run(reducer, rows)
    assert np.all(out >= benign.min(axis=0)) and np.all(out <= benign.max(axis=0))


def test_krum_selects_a_benign_update():
    rows, benign = benign_and_attackers(n_benign=8, n_bad=3, scale=1e3)
    reducer = krum(3)
    out, report = run_with_report(reducer, rows)
    assert any(np.array_equal(out, b) for b in benign)
    assert report["selected"][0] not in (0, 9, 10)  # the attackers' positions


def test_multi_krum_averages_exactly_the_benign_updates():
    rng = np.random.default_rng(1)
    benign = rng.normal(0, 0.1, size=(6, 4)).astype(np.float32)
    bad = np.array([[1e3, 0, 0, 0], [0, -1e3, 0, 0]], dtype=np.float32)
    rows = [benign[0], bad[0], *benign[1:4], bad[1], *benign[4:]]  # attackers at 1 and 5
    reducer = multi_krum(2)  # n = 8 > 2f + 2 = 6; m = n - f = 6
    out, report = run_with_report(reducer, rows)
    assert report["selected"] == [0, 2, 3, 4, 6, 7]
    np.testing.assert_allclose(out, benign.mean(axis=0), rtol=1e-6, atol=1e-7)


def test_krum_ranks_non_finite_updates_last():
    rows = [[np.nan, 0.0], [0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [np.inf, 1.0]]
    reducer = krum(1)
    out, report = run_with_report(reducer, rows)
    assert np.all(np.isfinite(out)) and report["selected"][0] in (1, 2, 3)


# -- assumptions and argument checks ------------------------------------------------------------
def test_krum_needs_more_than_2f_plus_2_updates():
    with pytest.raises(AggregationAssumptionError) as err:
        run(krum(3), np.zeros((6, 2)))
    assert str(err.value) == "krum(f=3) needs n > 2f + 2 = 8 updates, got 6: lower f or sample more clients"
    with pytest.raises(AggregationAssumptionError, match=r"got 8"):
        run(krum(3), np.zeros((8, 2)))
    assert run(krum(3), np.zeros((9, 2))).shape == (2,)
    with pytest.raises(AggregationAssumptionError, match=r"multi_krum\(f=1, m=None\) needs n > 2f \+ 2 = 4"):
        run(multi_krum(1), np.zeros((4, 2)))


def test_multi_krum_m_larger_than_n_is_refused_at_finish():
    with pytest.raises(AggregationAssumptionError, match=r"m = 10 updates but got only n = 5"):
        run(multi_krum(1, m=10), np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"m must be an int >= 1, got 0"):
        multi_krum(1, m=0)


def test_bulyan_needs_4f_plus_3_updates():
    with pytest.raises(AggregationAssumptionError) as err:
        run(bulyan(1), np.zeros((6, 2)))
    assert str(err.value) == "bulyan(f=1) needs n >= 4f + 3 = 7 updates, got 6: lower f or sample more clients"
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("beta", [0.5, 0.7, -0.1, float("nan")])
def test_trimmed_mean_fraction_must_be_below_half(beta):
    with pytest.raises(ValueError, match=r"trimmed mean needs 0 <= beta < 0.5, got"):
        trimmed_mean(beta)


def test_trimmed_mean_message_names_the_value():
    with pytest.raises(ValueError, match=r"^trimmed mean needs 0 <= beta < 0\.5, got 0\.5$"):
        trimmed_mean(0.5)


@pytest.mark.parametrize("factory", [krum, multi_krum, bulyan])
@pytest.mark.parametrize("f", [-1, 1.5, True, "2"])
def test_f_must_be_a_non_negative_int(factory, f):
    with pytest.raises(ValueError, match=r"f must be an int >= 0, got"):
        factory(f)


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
def test_finish_without_updates_is_an_empty_aggregation(name):
    reducer = make_reducer(name)
    with pytest.raises(EmptyAggregationError):
        reducer.finish(reducer.start(3))


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
@pytest.mark.parametrize("weight", [0, -1.0, float("nan")])
def test_weights_must_be_positive(name, weight):
    reducer = make_reducer(name)
    with pytest.raises(ValueError, match=r"weights must be > 0"):
        reducer.add(reducer.start(2), f32([1, 2]), weight)


def test_order_statistic_rules_ignore_weights():
    rows = [[0.0], [1.0], [5.0]]
    assert run(coordinate_median(), rows, [1, 1, 1000])[0] == 1.0
    assert run(trimmed_mean(0.0), rows, [1, 1, 1000])[0] == 2.0


def test_wrong_shape_is_refused():
    reducer = coordinate_median()
    with pytest.raises(ValueError, match=r"shape \(3,\), accumulator expects \(2,\)"):
        reducer.add(reducer.start(2), f32([1, 2, 3]), 1.0)


# -- clipping -----------------------------------------------------------------------------------
def test_clip_by_norm_golden_and_pure():
    v = f32([3, 4])
    np.testing.assert_allclose(clip_by_norm(v, 1.0), f32([0.6, 0.8]), rtol=1e-6)
    np.testing.assert_array_equal(v, f32([3, 4]))  # input untouched
    np.testing.assert_array_equal(clip_by_norm(f32([0.3, 0.4]), 1.0), f32([0.3, 0.4]))


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e30])
def test_clip_bounds_the_norm(scale):
    v = (np.random.default_rng(2).normal(size=10_000) * scale).astype(np.float32)
    out = clip_by_norm(v, 2.5)
    assert np.linalg.norm(out.astype(np.float64)) <= 2.5 * (1 + 1e-12)
    if np.linalg.norm(v.astype(np.float64)) <= 2.5:
        np.testing.assert_array_equal(out, v)
    else:  # same direction
        np.testing.assert_allclose(
            out / np.linalg.norm(out.astype(np.float64)), v / np.linalg.norm(v.astype(np.float64)), rtol=1e-5, atol=1e-7
        )


def test_clipped_mean_golden():
    out = run(clipped(weighted_mean(), 1.0), [[3, 4], [0, 0.5]])
    np.testing.assert_allclose(out, f32([0.3, 0.65]), rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_clip_norm_must_be_positive(bad):
    with pytest.raises(ValueError, match=r"max_norm must be a finite number > 0"):
        clipped(weighted_mean(), bad)
    with pytest.raises(ValueError, match=r"max_norm must be a finite number > 0"):
        clip_by_norm(f32([1.0]), bad)


def test_clipped_leaves_read_only_inputs_alone():
    v = f32([3, 4])
    v.setflags(write=False)
    reducer = clipped(weighted_mean(), 1.0)
    acc = reducer.add(reducer.start(2), v, 1.0)
    np.testing.assert_allclose(reducer.finish(acc)[0], f32([0.6, 0.8]), rtol=1e-6)
    np.testing.assert_array_equal(v, f32([3, 4]))


# -- screening ----------------------------------------------------------------------------------
def test_screened_rejects_nan_and_oversized_updates_and_logs(caplog):
    rng = np.random.default_rng(3)
    benign = rng.normal(size=(5, 8)).astype(np.float32)
    nan_update = benign[0].copy()
    nan_update[3] = np.nan
    rows = [benign[0], benign[1], nan_update, benign[2], benign[3] * 1000, benign[4]]
    weights = [1.0, 2.0, 1.0, 3.0, 1.0, 4.0]
    reducer = screened(weighted_mean())
    with caplog.at_level(logging.WARNING, logger="insitu"):
        out, report = run_with_report(reducer, rows, weights)
    assert report["rejected"] == [2, 4]
    kept_w = np.array([1.0, 2.0, 3.0, 4.0])
    expected = (benign[[0, 1, 2, 4]] * kept_w[:, None]).sum(axis=0) / kept_w.sum()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    messages = [r.getMessage() for r in caplog.records if r.name == "insitu" and r.levelno == logging.WARNING]
    assert len(messages) == 2
    assert "update 2 of 6" in messages[0] and "nan" in messages[0] and "non-finite" in messages[0]
    assert "update 4 of 6" in messages[1] and "above limit" in messages[1]


def test_screened_keeps_everything_when_nothing_is_odd():
    rows = np.random.default_rng(4).normal(size=(4, 3))
    reducer = screened(coordinate_median())
    out, report = run_with_report(reducer, rows)
    np.testing.assert_array_equal(out, np.median(rows.astype(np.float32), axis=0))
    assert report == {"rejected": []}


def test_screened_reports_when_too_few_survive():
    rows = np.ones((5, 2))
    rows[0, 0] = np.nan
    with pytest.raises(AggregationAssumptionError, match=r"after screening rejected 1 of 5 updates: krum\(f=1\) needs"):
        run(screened(krum(1)), rows)
    with pytest.raises(EmptyAggregationError, match=r"rejected all 2 updates"):
        run(screened(weighted_mean()), np.full((2, 2), np.nan))


def test_screened_ratio_is_checked():
    with pytest.raises(ValueError, match=r"max_norm_ratio"):
        screened(weighted_mean(), 0.5)


# -- registry -----------------------------------------------------------------------------------
def test_registry_builds_and_composes():
    assert AGGREGATOR_NAMES[:6] == ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan")
    assert "geometric_median" in AGGREGATOR_NAMES  # found in aggregation/rules/ by file
    reducer = make_reducer("krum", byzantine_f=1, clip_norm=2.0, screen=True)
    assert repr(reducer) == "pipeline(pre=[clip(2.0), screen(10.0)], reduce=krum(f=1))"
    assert reducer.properties.needs_individual and not reducer.properties.shift_equivariant
    assert reducer.properties.metrics == ("within_clip", "rejected", "selected")
    assert not make_reducer("mean").properties.needs_individual
    assert not make_reducer("mean", clip_norm=1.0).properties.needs_individual  # clipping streams
    assert repr(make_reducer("trimmed_mean", trim_fraction=0.2)) == "trimmed_mean(beta=0.2)"
    # the same composition by hand, as before: the clip wraps outermost, so it runs first
    assert repr(clipped(screened(krum(1)), 2.0)) == repr(reducer)


def test_registry_passes_each_factory_only_what_it_declares():
    assert repr(make_reducer("multi_krum", byzantine_f=1, m=3)) == "multi_krum(f=1, m=3)"
    assert repr(make_reducer("multi_krum", f=2, m="3")) == "multi_krum(f=2, m=3)"  # CLI strings: the declared type
    assert repr(make_reducer("mean", byzantine_f=3, trim_fraction=0.3)) == "weighted_mean()"  # not its settings
    with pytest.raises(ValueError, match=r"aggregator 'krum' has no option 'm'; its options are: f$"):
        make_reducer("krum", m=3)
    with pytest.raises(ValueError, match=r"aggregator 'mean' has no option 'max_iter'; its options are: none"):
        make_reducer("mean", max_iter=3)


def test_registry_min_updates():
    def min_updates(name, **options):
        return make_reducer(name, **options).properties.min_updates

    assert min_updates("mean") == 1 and min_updates("median") == 1
    assert min_updates("krum", byzantine_f=2) == 7
    assert min_updates("multi_krum", byzantine_f=2, screen=True) == 7
    assert min_updates("bulyan", byzantine_f=1, clip_norm=1.0) == 7


def test_registry_refuses_unknown_names_and_bad_settings():
    with pytest.raises(ValueError, match=r"unknown aggregator 'medoid'; choose one of: mean, median, trimmed_mean"):
        make_reducer("medoid")
    with pytest.raises(ValueError, match=r"clip_norm must be >= 0"):
        make_reducer("mean", clip_norm=-1.0)
    with pytest.raises(ValueError, match=r"byzantine_f must be an int >= 0"):
        make_reducer("krum", byzantine_f=-1)


# -- end to end through a strategy --------------------------------------------------------------
def fit_result(global_params, delta, num_examples):
    flat = global_params.flat() + np.asarray(delta, dtype=np.float32)
    return FitResult(Parameters.from_flat(flat, global_params.specs), num_examples, {"loss": 1.0})


def test_fedavg_with_median_moves_global_by_the_median_delta():
    global_params = Parameters.from_arrays({"w": f32([[1, 2], [3, 4]]), "b": f32([0.5, -0.5])})
    deltas = [
        [1.0, 0.0, 0.0, 2.0, 0.5, 0.0],
        [0.0, 2.0, -1.0, 2.0, -0.5, 0.25],
        [1e6, -1e6, 1e6, -1e6, 1e6, -1e6],  # an attacker, with a huge claimed weight
    ]
    results = [(f"c{i}", fit_result(global_params, d, n)) for i, (d, n) in enumerate(zip(deltas, [10, 20, 10**6]))]
    strategy = fedavg(reducer=make_reducer("median"))
    agg = strategy.aggregate_fit(global_params, None, results)
    median_delta = f32([1.0, 0.0, 0.0, 2.0, 0.5, 0.0])  # per coordinate, by hand
    np.testing.assert_allclose(agg.parameters.flat(), global_params.flat() + median_delta, rtol=0, atol=1e-6)
    assert agg.num_results == 3 and agg.parameters.names == global_params.names
    np.testing.assert_array_equal(global_params.flat(), f32([1, 2, 3, 4, 0.5, -0.5]))  # not mutated


def test_fedavg_with_clipped_screened_krum_end_to_end():
    global_params = Parameters.from_arrays({"w": f32([1, 1, 1])})
    deltas = [[0.1, 0.0, 0.0], [0.0, 0.1, 0.0], [1e6, 1e6, 1e6], [0.1, 0.1, 0.0], [0.05, 0.05, 0.05]]
    results = [(f"c{i}", fit_result(global_params, d, 5)) for i, d in enumerate(deltas)]
    reducer = make_reducer("krum", byzantine_f=1, clip_norm=1.0)
    agg = fedavg(reducer=reducer).aggregate_fit(global_params, None, results)
    new = agg.parameters.flat()
    assert np.linalg.norm(new - global_params.flat()) <= 1.0 + 1e-6
    assert agg.report["selected"][0] != 2 and agg.report["within_clip"] == 4


def test_a_file_in_the_rules_folder_registers_its_aggregator(tmp_path, monkeypatch):
    from insitu.aggregation import registry, rules

    (tmp_path / "first_update.py").write_text(
        "import numpy as np\n"
        "from insitu.aggregation.base import Properties\n"
        "from insitu.aggregation.registry import register\n"
        "from insitu.aggregation.robust import BufferingReducer\n\n"
        "class First(BufferingReducer):\n"
        "    properties = Properties(needs_individual=True)\n\n"
        "    def reduce(self, stacked, weights):\n"
        "        return stacked[0].copy(), {}\n\n"
        "@register('first_update')\n"
        "def first_update():\n"
        "    return First()\n"
    )
    monkeypatch.setattr(rules, "__path__", [*rules.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    monkeypatch.setattr(registry, "_discovered", False)
    assert registry.aggregator_names()[-1] == "first_update"  # found by its file, no edit elsewhere
    assert run(make_reducer("first_update"), [[1.0], [2.0]])[0] == 1.0
