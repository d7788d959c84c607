"""Learning-rate schedules and the fit_config they produce."""

from __future__ import annotations

import math

import numpy as np
import pytest

from insitu.strategies import fedavg
from insitu.strategies.schedules import (
    SCHEDULE_NAMES,
    constant,
    cosine_decay,
    exponential_decay,
    lr_config,
    make_schedule,
    step_decay,
)


def test_constant():
    s = constant(0.05)
    assert [s(r) for r in (1, 2, 100)] == [0.05, 0.05, 0.05]


def test_exponential_decay_exact():
    s = exponential_decay(0.1, 0.5)
    assert [s(r) for r in (1, 2, 3, 4)] == [0.1, 0.05, 0.025, 0.0125]


def test_step_decay_exact():
    s = step_decay(0.8, 0.5, every=2)
    assert [s(r) for r in (1, 2, 3, 4, 5, 6, 7)] == [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1]


def test_cosine_decay_exact():
    s = cosine_decay(0.1, total_rounds=4, final_lr=0.02)
    # final + (lr - final) * (1 + cos(pi * (r - 1) / 4)) / 2
    expected = [
        0.02 + 0.08 * (1 + 1.0) / 2,  # round 1: cos(0) = 1
        0.02 + 0.08 * (1 + math.sqrt(0.5)) / 2,  # round 2: cos(pi/4)
        0.02 + 0.08 * (1 + 0.0) / 2,  # round 3: cos(pi/2) = 0
        0.02 + 0.08 * (1 - math.sqrt(0.5)) / 2,  # round 4: cos(3pi/4)
    ]
    assert [s(r) for r in (1, 2, 3, 4)] == pytest.approx(expected, rel=1e-12)
    assert s(5) == s(4) == s(50)  # held after total_rounds: never drops to final_lr
    assert all(cosine_decay(1.0, 3)(r) > 0 for r in range(1, 10))  # always a valid client lr


def test_rounds_accept_numpy_integers_and_reject_zero():
    assert exponential_decay(0.1, 0.5)(np.int64(2)) == 0.05
    with pytest.raises(ValueError, match="counted from 1"):
        constant(0.1)(0)


def test_lr_config_merges_base_and_overrides_lr():
    cfg = lr_config(exponential_decay(0.1, 0.5), {"local_epochs": 2, "lr": 9.0})
    assert cfg(2) == {"local_epochs": 2, "lr": 0.05}
    assert lr_config(constant(0.1))(1) == {"lr": 0.1}
    per_round = lr_config(constant(0.1), lambda r: {"round_seen": r})
    assert per_round(3) == {"round_seen": 3, "lr": 0.1}


def test_lr_config_does_not_share_dicts():
    base = {"local_epochs": 1}
    cfg = lr_config(constant(0.1), base)
    cfg(1)["local_epochs"] = 7
    assert base == {"local_epochs": 1} and cfg(2)["local_epochs"] == 1


def test_strategy_uses_the_schedule_per_round():
    strategy = fedavg(fit_config=lr_config(exponential_decay(0.1, 0.5)))
    assert strategy.fit_config_for(3)["lr"] == 0.025


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: constant(0.0), r"lr must be a finite number > 0, got 0.0"),
        (lambda: exponential_decay(0.1, 0.0), r"decay must be in \(0, 1\], got 0.0"),
        (lambda: exponential_decay(0.1, 1.5), r"decay must be in \(0, 1\], got 1.5"),
        (lambda: step_decay(0.1, 0.5, every=0), r"every must be an integer >= 1, got 0"),
        (lambda: step_decay(0.1, 0.5, every=2.5), r"every must be an integer >= 1, got 2.5"),
        (lambda: cosine_decay(0.1, 0), r"total_rounds must be an integer >= 1, got 0"),
        (lambda: cosine_decay(0.1, 10, final_lr=0.2), r"final_lr must be in \[0, lr=0.1\], got 0.2"),
        (lambda: make_schedule("step", 0.1, decay=0.5), r"schedule 'step' needs every="),
        (lambda: make_schedule("linear", 0.1), r"valid names: constant, exponential, step, cosine"),
    ],
)
def test_bad_arguments_fail_clearly(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_lr_config_rejects_non_callables():
    with pytest.raises(TypeError, match="schedule must be a callable"):
        lr_config(0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="base must be"):
        lr_config(constant(0.1), [("lr", 1)])  # type: ignore[arg-type]


def test_make_schedule_by_name():
    assert SCHEDULE_NAMES == ("constant", "exponential", "step", "cosine")
    assert make_schedule("constant", 0.1)(7) == 0.1
    assert make_schedule("exponential", 0.1, decay=0.5)(3) == 0.025
    assert make_schedule("step", 0.8, decay=0.5, every=2)(3) == 0.4
    assert make_schedule("cosine", 0.1, total_rounds=4, final_lr=0.02)(3) == pytest.approx(0.06)
