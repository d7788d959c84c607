"""Model-poisoning attacks: a malicious client tampers with its update before sending it.

Every attack acts on the client's *delta* (its trained model minus the global model it was sent)
and is a small frozen dataclass, so a run's attack is a plain, printable, comparable value.
:class:`MaliciousClient` wraps any honest :class:`~insitu.client.api.Client` and applies one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Real
from typing import Protocol, runtime_checkable

import numpy as np

from insitu.client.api import Client, Config, EvalResult, FitResult
from insitu.params import Parameters, describe_mismatch

__all__ = [
    "GaussianNoise",
    "MaliciousClient",
    "Scaling",
    "SignFlip",
    "UpdateAttack",
    "gaussian_noise",
    "scaling",
    "sign_flip",
]


@runtime_checkable
class UpdateAttack(Protocol):
    """Anything that turns an honest delta into a malicious one (same shape, float32)."""

    def __call__(self, delta: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


def _check_positive(value: float, what: str) -> None:
    """Reject non-finite or non-positive attack strengths with a message naming the knob."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class SignFlip:
    """delta -> -scale * delta: push the global model the opposite way, boosted (sign-flipping attack)."""

    scale: float = 10.0

    def __post_init__(self) -> None:
        _check_positive(self.scale, "sign_flip scale")

    def __call__(self, delta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return (-float(self.scale) * np.asarray(delta, dtype=np.float32)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Scaling:
    """delta -> factor * delta: a boosted update that dominates the average (Bhagoji et al. 2019)."""

    factor: float = 10.0

    def __post_init__(self) -> None:
        _check_positive(self.factor, "scaling factor")

    def __call__(self, delta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return (float(self.factor) * np.asarray(delta, dtype=np.float32)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class GaussianNoise:
    """delta -> N(0, std^2) noise of the same shape: a random update that ignores training entirely."""

    std: float = 1.0

    def __post_init__(self) -> None:
        _check_positive(self.std, "gaussian_noise std")

    def __call__(self, delta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return rng.normal(0.0, float(self.std), size=np.shape(delta)).astype(np.float32)


def sign_flip(scale: float = 10.0) -> SignFlip:
    """The sign-flipping attack, delta -> -scale * delta."""
    return SignFlip(scale)


def scaling(factor: float = 10.0) -> Scaling:
    """The boosting attack, delta -> factor * delta."""
    return Scaling(factor)


def gaussian_noise(std: float = 1.0) -> GaussianNoise:
    """The random-update attack, delta -> N(0, std^2) noise."""
    return GaussianNoise(std)


class MaliciousClient:
    """A Client that trains honestly through ``inner`` and then poisons the update it returns.

    The delta is taken against the global parameters it was sent (copied *before* training: in
    simulation they may share memory with the model being trained). Only floating-point arrays
    are attacked; integer ones (BatchNorm's ``num_batches_tracked``) keep the inner client's values.
    The result is always a fresh Parameters, never a write into the inner client's (possibly
    shared) result. Noise is drawn from a numpy Generator seeded by the config's ``"seed"``
    (``seed`` when the config has none), so runs are reproducible.
    """

    def __init__(self, inner: Client, attack: UpdateAttack, *, seed: int = 0) -> None:
        if not callable(attack):
            raise TypeError(f"attack must be callable as attack(delta, rng), got {type(attack).__name__}")
        self.inner = inner
        self.attack = attack
        self.seed = seed

    def fit(self, parameters: Parameters, config: Config) -> FitResult:
        """Run the inner client's fit, then replace its update by the attacked one."""
        global_flat = np.array(parameters.flat(), dtype=np.float32, copy=True)
        global_specs = parameters.specs
        result = self.inner.fit(parameters, config)
        honest = result.parameters
        problem = describe_mismatch(honest.specs, global_specs)
        if problem:
            raise ValueError(f"MaliciousClient: the inner client returned parameters unlike the global ones: {problem}")

        if all(np.issubdtype(a.dtype, np.floating) for a in honest.arrays):
            float_mask: np.ndarray | slice = slice(None)  # the usual case: no model-sized mask copies
        else:
            float_mask = np.concatenate([np.full(a.size, np.issubdtype(a.dtype, np.floating)) for a in honest.arrays])
        delta = (honest.flat()[float_mask] - global_flat[float_mask]).astype(np.float32, copy=False)
        seed = config.get("seed", self.seed)
        if isinstance(seed, Parameters):  # int() would refuse it too, with a less helpful message
            raise TypeError(f"MaliciousClient: config 'seed' must be an integer, got {seed!r}")
        rng = np.random.default_rng(int(seed))
        attacked = np.asarray(self.attack(delta, rng), dtype=np.float32)
        if attacked.shape != delta.shape:
            raise ValueError(
                f"MaliciousClient: attack {self.attack!r} returned shape {attacked.shape}, expected {delta.shape}"
            )
        poisoned = global_flat  # our private copy: safe to overwrite
        poisoned[float_mask] += attacked
        metrics = {**result.metrics, "malicious": 1.0}
        # replace() keeps num_examples and any other field (e.g. an algorithm's extras) as the inner client's
        return replace(result, parameters=_rebuild(poisoned, honest), metrics=metrics)

    def evaluate(self, parameters: Parameters, config: Config) -> EvalResult:
        """Evaluate honestly: the attacker reports like any other client."""
        return self.inner.evaluate(parameters, config)

    def __repr__(self) -> str:
        return f"MaliciousClient({self.inner!r}, {self.attack!r})"


def _rebuild(vector: np.ndarray, honest: Parameters) -> Parameters:
    """Fresh Parameters shaped like ``honest``: float arrays from ``vector``, others copied from ``honest``."""
    specs = honest.specs
    if all(s.dtype == np.float32 for s in specs):
        return Parameters.from_flat(vector, specs, copy=False)  # ``vector`` is ours: hand it over
    arrays, offset = [], 0
    for spec, array in zip(specs, honest.arrays):
        if np.issubdtype(spec.dtype, np.floating):
            arrays.append(vector[offset : offset + spec.size].reshape(spec.shape).astype(spec.dtype, copy=True))
        else:
            arrays.append(np.array(array, copy=True))
        offset += spec.size
    return Parameters([s.name for s in specs], arrays)
