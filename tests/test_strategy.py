import numpy as np
import pytest

from insitu.params import Parameters
from insitu.aggregation import weighted_mean
from insitu.strategies import Strategy, fedavg, fedsgd


@pytest.mark.parametrize(
    "fraction, minimum, available, expected",
    [(1.0, 2, 10, 10), (0.1, 1, 100, 10), (0.1, 15, 100, 15), (0.25, 1, 10, 3), (0.5, 2, 3, 2), (0.01, 1, 10, 1)],
)
def test_number_of_clients_sampled(fraction, minimum, available, expected):
    s = fedavg(fraction_fit=fraction, min_fit_clients=minimum, min_available_clients=minimum)
    ids = [str(i) for i in range(available)]
    chosen = s.sample_fit(ids, np.random.default_rng(0))
    assert len(chosen) == expected and len(set(chosen)) == expected and set(chosen) <= set(ids)


def test_sampling_is_deterministic_by_rng_seed():
    s = fedavg(fraction_fit=0.1, min_fit_clients=1, min_available_clients=1)
    ids = [str(i) for i in range(100)]
    a = s.sample_fit(ids, np.random.default_rng([7, 3]))
    assert a == s.sample_fit(ids, np.random.default_rng([7, 3]))
    assert a != s.sample_fit(ids, np.random.default_rng([7, 4]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fraction_fit": 0.0}, "fraction_fit must be in"),
        ({"fraction_fit": 1.5}, "fraction_fit must be in"),
        ({"fraction_evaluate": -0.1}, "fraction_evaluate"),
        ({"min_fit_clients": 0}, "min_fit_clients must be >= 1"),
        ({"min_fit_clients": 5, "min_available_clients": 2}, "min_available_clients"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Strategy(**kwargs)


def test_fedsgd_forces_one_full_batch_step_and_keeps_other_keys():
    s = fedsgd(fit_config=lambda r: {"lr": 0.1 * r, "batch_size": 32})
    assert s.fit_config_for(2) == {"lr": pytest.approx(0.2), "batch_size": 0, "local_epochs": 1}


def test_fit_config_schedule_is_called_per_round():
    s = fedavg(fit_config=lambda r: {"lr": 1.0 / r})
    assert s.fit_config_for(4) == {"lr": 0.25}


def test_each_round_composes_one_pipeline_from_the_settings():
    from insitu.privacy.central import CentralDP
    from insitu.privacy.distributed import DistributedDP
    from insitu.privacy.secure import SecureAggregation

    dp = CentralDP(noise_multiplier=1.0, clip_norm=2.0, sample_rate=0.5)
    central = fedavg(privacy=dp)
    state = central.init_state(Parameters.from_arrays({"w": np.zeros(3, np.float32)}))
    reducer, plan = central.round_reducer(state, 10, 3)
    assert repr(reducer) == "pipeline(pre=[clip(2.0)], reduce=total(), post=[gaussian_noise(std=2, sensitivity=2), scale(0.2)])"
    assert plan is None and reducer.properties.sensitivity == pytest.approx(0.4)  # C / (q N)
    secure = fedavg(privacy=dp, secure_aggregation=SecureAggregation())
    reducer, _ = secure.round_reducer(state, 10, 3)
    assert repr(reducer).startswith("pipeline(reduce=secure_sum(ClippedInputs), post=[gaussian_noise(std=2")
    distributed = fedavg(privacy=DistributedDP(1.0, 1.0, 0.5), secure_aggregation=SecureAggregation())
    reducer, plan = distributed.round_reducer(distributed.init_state(Parameters.from_arrays({"w": np.zeros(3)})), 10, 3)
    assert plan is not None and repr(reducer) == "pipeline(reduce=secure_sum(DistributedInputs), post=[scale(0.2)])"
    plain = fedavg()
    assert plain.round_reducer(plain.init_state(Parameters.from_arrays({"w": np.zeros(3)})), 10, 3)[0] is plain.reducer


def test_a_reducer_without_declared_properties_is_refused_with_the_fix():
    class Legacy:
        streaming = True

    with pytest.raises(TypeError, match=r"declares no properties: give it `properties = Properties\(...\)`"):
        Strategy(reducer=Legacy())


@pytest.mark.parametrize("extra", [
    {"privacy": "central"}, {"secure_aggregation": True},
], ids=["central-dp", "secure-aggregation"])
def test_a_linear_reducer_other_than_the_mean_is_refused_where_dp_or_secagg_would_replace_it(extra):
    """DP and secure aggregation build the round's mean from their own stages: a total() or a scaled mean
    would silently not run, so it is refused when the strategy is built."""
    from insitu.aggregation import pipeline, total
    from insitu.aggregation.noise import scale
    from insitu.privacy.central import CentralDP
    from insitu.privacy.secure import SecureAggregation

    kwargs = {"privacy": CentralDP(1.0, 1.0, 0.5)} if "privacy" in extra else {
        "secure_aggregation": SecureAggregation(10.0), "min_fit_clients": 1, "min_available_clients": 1}
    for reducer in (total(), pipeline(reduce=weighted_mean(), post=[scale(0.5)])):
        with pytest.raises(ValueError, match="would not run"):
            fedavg(reducer=reducer, **kwargs)
    fedavg(reducer=weighted_mean(), **kwargs)  # the mean itself is what they stand in for
