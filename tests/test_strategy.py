import numpy as np
import pytest

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
