"""Client learning-rate schedules, delivered through the per-round fit config.

A schedule maps a server round (counted from 1) to the ``lr`` the clients train with that round;
``lr_config`` turns one into a ``fit_config`` callable for a :class:`~insitu.strategies.Strategy`:

    fedavg(fit_config=lr_config(cosine_decay(0.1, total_rounds=50), {"local_epochs": 2}))

Every schedule returns a value > 0 for every round, since clients reject ``lr <= 0``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

Schedule = Callable[[int], float]
BaseConfig = Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None

SCHEDULE_NAMES = ("constant", "exponential", "step", "cosine")


def _check_lr(name: str, lr: float) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {lr}")


def _check_factor(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_round(server_round: int) -> None:
    if isinstance(server_round, bool) or not isinstance(server_round, numbers.Integral) or server_round < 1:
        raise ValueError(f"server rounds are integers counted from 1, got {server_round!r}")


def constant(lr: float) -> Schedule:
    """The same lr every round (what a plain ``{"lr": lr}`` config does), for uniform call sites."""
    _check_lr("lr", lr)

    def schedule(server_round: int) -> float:
        _check_round(server_round)
        return float(lr)

    return schedule


def exponential_decay(lr: float, decay: float) -> Schedule:
    """lr * decay ** (round - 1): a fixed fraction less each round."""
    _check_lr("lr", lr)
    _check_factor("decay", decay)

    def schedule(server_round: int) -> float:
        _check_round(server_round)
        return lr * decay ** (server_round - 1)

    return schedule


def step_decay(lr: float, factor: float, every: int) -> Schedule:
    """lr * factor ** ((round - 1) // every): multiply by ``factor`` after each ``every`` rounds."""
    _check_lr("lr", lr)
    _check_factor("factor", factor)
    _check_count("every", every)

    def schedule(server_round: int) -> float:
        _check_round(server_round)
        return lr * factor ** ((server_round - 1) // every)

    return schedule


def cosine_decay(lr: float, total_rounds: int, final_lr: float = 0.0) -> Schedule:
    """Half a cosine from lr (round 1) towards final_lr, as torch's CosineAnnealingLR(T_max=total_rounds).

    Round r uses final_lr + (lr - final_lr) * (1 + cos(pi * (r - 1) / total_rounds)) / 2, so the last
    round still trains (final_lr would only be reached at round total_rounds + 1); later rounds keep
    the last round's value rather than dropping to a possibly zero final_lr.
    """
    _check_lr("lr", lr)
    _check_count("total_rounds", total_rounds)
    if not (math.isfinite(final_lr) and 0.0 <= final_lr <= lr):
        raise ValueError(f"final_lr must be in [0, lr={lr}], got {final_lr}")

    def schedule(server_round: int) -> float:
        _check_round(server_round)
        step = min(server_round, total_rounds) - 1
        return final_lr + (lr - final_lr) * (1.0 + math.cos(math.pi * step / total_rounds)) / 2.0

    return schedule


def lr_config(schedule: Schedule, base: BaseConfig = None) -> Callable[[int], dict[str, Any]]:
    """A fit_config callable: ``{**base, "lr": schedule(round)}``; base may itself depend on the round."""
    if not callable(schedule):
        raise TypeError(f"schedule must be a callable round -> lr, got {type(schedule).__name__}")
    if base is not None and not callable(base) and not isinstance(base, Mapping):
        raise TypeError(f"base must be a dict, a callable round -> dict, or None; got {type(base).__name__}")

    def config(server_round: int) -> dict[str, Any]:
        fixed = {} if base is None else base(server_round) if callable(base) else base
        return {**fixed, "lr": float(schedule(server_round))}

    return config


def make_schedule(
    name: str,
    lr: float,
    *,
    decay: float | None = None,
    every: int | None = None,
    total_rounds: int | None = None,
    final_lr: float = 0.0,
) -> Schedule:
    """A schedule by name (for CLIs and configs); ``decay`` is also step's factor. No silent defaults:
    a schedule's own knobs must be given."""

    def need(value: Any, arg: str) -> Any:
        if value is None:
            raise ValueError(f"schedule {name!r} needs {arg}=")
        return value

    if name == "constant":
        return constant(lr)
    if name == "exponential":
        return exponential_decay(lr, need(decay, "decay"))
    if name == "step":
        return step_decay(lr, need(decay, "decay"), need(every, "every"))
    if name == "cosine":
        return cosine_decay(lr, need(total_rounds, "total_rounds"), final_lr)
    raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(SCHEDULE_NAMES)}")
