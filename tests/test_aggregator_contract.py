"""The contract every aggregator and composed pipeline keeps, checked against its declared properties.

Iterates the registry (a file added to aggregation/rules/ is covered without an edit here) and a set
of composed pipelines. Properties: finite float32 output of the input's shape, in a new array;
permutation invariance; weight-scale invariance where weights are used, and weights ignored where
not; identity on equal inputs (a sum: n times the input); a declared linear stage is the weighted
mean or additive; a declared shift-equivariant one commutes with shifts; fewer than min_updates is
refused; a declared sensitivity bounds one client's effect; a streaming stage keeps no update.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from insitu.aggregation import (
    AggregationAssumptionError,
    Properties,
    aggregator_names,
    clip,
    clip_by_norm,
    coordinate_median,
    gaussian_noise,
    krum,
    make_reducer,
    multi_krum,
    pipeline,
    scale,
    screen,
    total,
    weighted_mean,
)
from insitu.aggregation.rules.geometric_median import geometric_median
from insitu.privacy.central import CentralDP
from insitu.privacy.secure import SecureAggregation
from insitu.strategies import fedavg, scaffold

COMPOSED = {
    "clip+mean": lambda: pipeline(pre=[clip(1.0)], reduce=weighted_mean()),
    "screen+krum": lambda: pipeline(pre=[screen()], reduce=krum(1)),
    "clip+median": lambda: pipeline(pre=[clip(1.0)], reduce=coordinate_median()),
    "clip+screen+multi_krum": lambda: pipeline(pre=[clip(2.0), screen()], reduce=multi_krum(1)),
    "clip+geometric_median": lambda: pipeline(pre=[clip(1.0)], reduce=geometric_median()),
    "clip+sum+scale": lambda: pipeline(pre=[clip(1.0)], reduce=total(), post=[scale(0.25)]),
}
BUILDERS = {**{name: functools.partial(make_reducer, name, byzantine_f=1, trim_fraction=0.2)
               for name in aggregator_names()}, **COMPOSED}
NAMES = sorted(BUILDERS)
SUMS = {"clip+sum+scale"}  # DP's release: a (scaled) sum, not an average of its inputs
SEEDS = st.integers(0, 2**32 - 1)


def run(reducer, rows, weights):
    """Feed copies of ``rows`` (as a strategy does) and finish: (aggregate, report)."""
    acc = reducer.start(rows.shape[1])
    for row, weight in zip(rows, weights):
        acc = reducer.add(acc, row.copy(), float(weight))
    return reducer.finish(acc)


def sample(seed: int, n: int, dim: int = 5, spread: float = 0.3):
    """n updates (float32, norms ~ spread x sqrt(dim), below the clips) and positive weights."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, dim)) * spread).astype(np.float32), rng.uniform(1, 50, size=n)


def count(props: Properties, extra: int = 4) -> int:
    return max(props.min_updates, 1) + extra


def close(a, b, scale_of=1.0):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, scale_of))


# -- shape, dtype, report ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_finite_float32_output_of_the_input_shape_in_a_new_array(name):
    reducer = BUILDERS[name]()
    rows, weights = sample(0, count(reducer.properties))
    fed = [row.copy() for row in rows]
    acc = reducer.start(rows.shape[1])
    for row, weight in zip(fed, weights):
        acc = reducer.add(acc, row, float(weight))
    out, report = reducer.finish(acc)
    assert out.dtype == np.float32 and out.shape == (rows.shape[1],) and np.all(np.isfinite(out))
    assert not any(np.shares_memory(out, row) for row in fed)
    assert set(report) == set(reducer.properties.metrics)  # exactly the declared metrics


# -- invariances (Hypothesis over seeds and sizes: continuous values, so no ties to break) -------
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8, deadline=None)
@given(seed=SEEDS, extra=st.integers(0, 4), data=st.data())
def test_permutation_of_clients_changes_nothing(name, seed, extra, data):
    reducer = BUILDERS[name]()
    rows, weights = sample(seed, count(reducer.properties, extra))
    order = np.array(data.draw(st.permutations(range(len(rows)))))
    close(run(reducer, rows[order], weights[order])[0], run(reducer, rows, weights)[0])


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=6, deadline=None)
@given(seed=SEEDS, factor=st.sampled_from([1e-3, 0.5, 7.0, 1e4]))
def test_weights_scaled_together_change_nothing_and_unused_weights_are_ignored(name, seed, factor):
    reducer = BUILDERS[name]()
    rows, weights = sample(seed, count(reducer.properties))
    base = run(reducer, rows, weights)[0]
    close(run(reducer, rows, weights * factor)[0], base)
    other = np.random.default_rng(seed + 1).uniform(1e-3, 1e3, size=len(weights))
    if not reducer.properties.uses_weights:
        np.testing.assert_array_equal(run(reducer, rows, other)[0], base)
    else:  # a stage that declares it uses weights must: very different weights move its output
        assert not np.allclose(run(reducer, rows, other)[0], base, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=6, deadline=None)
@given(seed=SEEDS, extra=st.integers(0, 3))
def test_equal_inputs_give_that_input_back(name, seed, extra):
    reducer = BUILDERS[name]()
    n = count(reducer.properties, extra)
    value = sample(seed, 1)[0][0]
    value *= np.float32(0.5 / np.linalg.norm(value))  # norm 0.5: no clip changes it
    rows, weights = np.tile(value, (n, 1)), sample(seed, n)[1]
    out = run(reducer, rows, weights)[0]
    if name in SUMS:  # n equal inputs: n times one; and a sum is additive
        close(out, run(reducer, rows[:1], weights[:1])[0] * n)
        rows, weights = sample(seed, n + 2)
        close(run(reducer, rows, weights)[0], run(reducer, rows[:2], weights[:2])[0] + run(reducer, rows[2:], weights[2:])[0])
    else:
        close(out, value)


# -- declared properties against behaviour ------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=6, deadline=None)
@given(seed=SEEDS)
def test_a_linear_stage_is_the_weighted_mean_or_additive(name, seed):
    reducer = BUILDERS[name]()
    if not reducer.properties.linear:
        return
    rows, weights = sample(seed, count(reducer.properties))
    out = run(reducer, rows, weights)[0]
    if reducer.properties.uses_weights:
        close(out, (weights[:, None] * rows.astype(np.float64)).sum(axis=0) / weights.sum())
    else:
        close(out, run(reducer, rows[:2], weights[:2])[0] + run(reducer, rows[2:], weights[2:])[0])


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=6, deadline=None)
@given(seed=SEEDS, shift=st.floats(-100, 100))
def test_a_shift_equivariant_stage_commutes_with_a_shift(name, seed, shift):
    reducer = BUILDERS[name]()
    if not reducer.properties.shift_equivariant:
        return
    rows, weights = sample(seed, count(reducer.properties))
    close(run(reducer, rows + np.float32(shift), weights)[0], run(reducer, rows, weights)[0] + np.float32(shift),
          scale_of=abs(shift))


@pytest.mark.parametrize("name", NAMES)
def test_one_update_fewer_than_min_updates_is_refused(name):
    reducer = BUILDERS[name]()
    needed = reducer.properties.min_updates
    if needed == 0:  # a sum of nothing is the zero vector (DP releases the noise alone)
        out, _ = reducer.finish(reducer.start(3))
        np.testing.assert_array_equal(out, np.zeros(3, np.float32))
        return
    if needed > 1:
        rows, weights = sample(2, needed - 1)
        with pytest.raises(AggregationAssumptionError):
            run(reducer, rows, weights)
    with pytest.raises(AggregationAssumptionError):  # no update at all
        reducer.finish(reducer.start(3))
    rows, weights = sample(3, needed)
    assert np.all(np.isfinite(run(reducer, rows, weights)[0]))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=6, deadline=None)
@given(seed=SEEDS, magnitude=st.floats(1e-3, 1e30))
def test_a_declared_sensitivity_bounds_what_one_client_can_change(name, seed, magnitude):
    reducer = BUILDERS[name]()
    bound = reducer.properties.sensitivity
    if bound is None:
        return
    rows, weights = sample(seed, count(reducer.properties))
    other = (np.random.default_rng(seed + 7).normal(size=(1, rows.shape[1])) * magnitude).astype(np.float32)
    without = run(reducer, rows, weights)[0].astype(np.float64)
    with_one = run(reducer, np.concatenate([rows, other]), np.append(weights, 1.0))[0].astype(np.float64)
    assert np.linalg.norm(with_one - without) <= bound * (1 + 1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, magnitude=st.floats(1e-6, 1e30), max_norm=st.floats(1e-3, 1e3))
def test_the_clip_stage_bounds_every_update_by_its_declared_sensitivity(seed, magnitude, max_norm):
    stage = clip(max_norm)
    update = (np.random.default_rng(seed).normal(size=50) * magnitude).astype(np.float32)
    out, report = stage.apply(update.copy())
    assert np.linalg.norm(out.astype(np.float64)) <= stage.properties.sensitivity
    assert report["within_clip"] == int(np.linalg.norm(update.astype(np.float64)) <= max_norm)
    np.testing.assert_array_equal(out, clip_by_norm(update, max_norm))  # one clip function


@pytest.mark.parametrize("name", NAMES)
def test_a_streaming_stage_keeps_no_update(name):
    reducer = BUILDERS[name]()
    if reducer.properties.needs_individual:
        return
    rows, weights = sample(4, count(reducer.properties))
    shared = np.empty(rows.shape[1], np.float32)  # one buffer, overwritten by every update
    acc = reducer.start(rows.shape[1])
    for row, weight in zip(rows, weights):
        shared[:] = row
        acc = reducer.add(acc, shared, float(weight))
    np.testing.assert_array_equal(reducer.finish(acc)[0], run(reducer, rows, weights)[0])


# -- compositions refused where they are built, with the reason ---------------------------------
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: pipeline(pre=[clip(1.0)], reduce=coordinate_median(), post=[gaussian_noise(1.0, 1.0)]),
         r"calibrated to a per-client L2 sensitivity of 1, but .*coordinate_median\(\) has sensitivity unbounded"),
        (lambda: pipeline(reduce=weighted_mean(), post=[gaussian_noise(1.0, 1.0)]), "not a weighted mean"),
        (lambda: pipeline(pre=[clip(2.0)], reduce=total(), post=[gaussian_noise(1.0, 1.0)]), "has sensitivity 2"),
        (lambda: pipeline(pre=[clip(1.0), screen()], reduce=total(), post=[gaussian_noise(1.0, 1.0)]),
         "sensitivity unbounded"),
        (lambda: pipeline(pre=[screen()], reduce=SecureAggregation().weighted_mean()), "reveals only the sum"),
    ],
)
def test_pipelines_that_cannot_be_honoured_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_dp_noise_follows_a_clipped_sum_and_the_pipeline_declares_it():
    released = pipeline(pre=[clip(1.0)], reduce=total(), post=[gaussian_noise(2.0, 1.0), scale(0.25)])
    assert released.properties.sensitivity == pytest.approx(0.25) and not released.properties.linear


DP = CentralDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reducer": coordinate_median(), "privacy": DP}, r"central DP .* cannot follow coordinate_median\(\)"),
        ({"reducer": make_reducer("mean", clip_norm=1.0), "privacy": DP}, "without clip_norm or screen"),
        ({"reducer": krum(1), "secure_aggregation": SecureAggregation()}, r"reveals only the sum: krum\(f=1\) needs"),
        ({"reducer": make_reducer("mean", screen=True), "secure_aggregation": SecureAggregation()},
         "needs individual updates"),
        ({"reducer": make_reducer("mean", clip_norm=1.0), "secure_aggregation": SecureAggregation()},
         "not a weighted sum"),
    ],
)
def test_a_strategy_refuses_what_its_reducer_cannot_compose_with(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fedavg(**kwargs)


def test_scaffold_extras_are_refused_under_secure_aggregation_and_dp():
    with pytest.raises(ValueError, match="secure aggregation"):
        scaffold(secure_aggregation=SecureAggregation())
    with pytest.raises(ValueError, match="neither clips nor noises"):
        scaffold(privacy=DP, min_fit_clients=1)
