import itertools

import numpy as np
import pytest

from insitu.aggregation import EmptyAggregationError, weighted_average_metrics, weighted_mean
from insitu.client.api import FitResult
from insitu.params import Parameters
from insitu.strategies import fedavg, sgd


def _mean(updates, weights):
    r = weighted_mean()
    acc = r.start(len(updates[0]))
    for u, w in zip(updates, weights):
        acc = r.add(acc, np.asarray(u, dtype=np.float32), w)
    return r.finish(acc)[0]


def test_weighted_mean_hand_computed_unequal_weights():
    # (1*[1,2] + 3*[5,6]) / 4 = [16/4, 20/4] = [4, 5]
    assert np.array_equal(_mean([[1, 2], [5, 6]], [1, 3]), np.array([4.0, 5.0], dtype=np.float32))
    # (2*[0,0,3] + 1*[3,-3,0] + 7*[1,1,1]) / 10 = [10/10, 4/10, 13/10]
    out = _mean([[0, 0, 3], [3, -3, 0], [1, 1, 1]], [2, 1, 7])
    assert np.allclose(out, [1.0, 0.4, 1.3], atol=1e-7)


def test_weighted_mean_properties():
    rng = np.random.default_rng(0)
    updates = rng.normal(size=(5, 7)).astype(np.float32)
    weights = [3, 1, 4, 1, 5]
    ref = _mean(updates, weights)
    scaled = _mean(updates, [10 * w for w in weights])
    assert np.allclose(ref, scaled, atol=1e-6)
    for perm in itertools.islice(itertools.permutations(range(5)), 10):
        assert np.allclose(ref, _mean(updates[list(perm)], [weights[i] for i in perm]), atol=1e-6)


def test_weighted_mean_rejects_bad_weight_and_empty():
    r = weighted_mean()
    acc = r.start(2)
    with pytest.raises(ValueError, match="weights must be > 0"):
        r.add(acc, np.zeros(2, np.float32), 0)
    with pytest.raises(EmptyAggregationError):
        r.finish(acc)


def test_fedavg_strategy_hand_computed():
    g = Parameters.from_arrays({"w": np.array([0.0, 0.0], np.float32), "n": np.array(2, np.int64)})
    r1 = FitResult(Parameters.from_arrays({"w": np.array([1.0, 2.0], np.float32), "n": np.array(4, np.int64)}), 100, {"train_loss": 1.0})
    r2 = FitResult(Parameters.from_arrays({"w": np.array([4.0, -1.0], np.float32), "n": np.array(8, np.int64)}), 300, {"train_loss": 2.0})
    out = fedavg().aggregate_fit(g, None, iter([("a", r1), ("b", r2)]))
    # w: (100*[1,2] + 300*[4,-1]) / 400 = [13/4, -1/4]; n: (100*4 + 300*8)/400 = 7
    assert np.allclose(dict(out.parameters)["w"], [3.25, -0.25])
    assert dict(out.parameters)["n"] == 7 and dict(out.parameters)["n"].dtype == np.int64
    assert out.metrics == {"train_loss": pytest.approx(1.75)}
    assert out.num_results == 2


def test_server_learning_rate_scales_the_step():
    g = Parameters.from_arrays({"w": np.array([1.0], np.float32)})
    r = FitResult(Parameters.from_arrays({"w": np.array([3.0], np.float32)}), 1)
    out = fedavg(server_optimizer=sgd(0.5)).aggregate_fit(g, None, [("a", r)])
    assert dict(out.parameters)["w"][0] == pytest.approx(2.0)


def test_metric_averaging_is_weighted_and_skips_missing():
    out = weighted_average_metrics([(1, {"acc": 1.0}), (3, {"acc": 0.0, "extra": 2.0}), (2, {"name": "x"})])
    assert out == {"acc": pytest.approx(0.25), "extra": pytest.approx(2.0)}
