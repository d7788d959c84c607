"""insitu.attacks: simulated malicious clients, for research on robust aggregation.

Two families: *update* (model-poisoning) attacks that tamper with a client's delta before it is
sent (:class:`MaliciousClient` with :func:`make_update_attack`), and *data* attacks that poison
the client's training set (:func:`flip_labels`, :func:`poison_with_backdoor`).
"""

from __future__ import annotations

from numbers import Real

import numpy as np

from insitu.attacks.data_poisoning import (
    Trigger,
    attack_success_rate,
    flip_labels,
    poison_with_backdoor,
    triggered_test_set,
)
from insitu.attacks.model_poisoning import (
    GaussianNoise,
    MaliciousClient,
    Scaling,
    SignFlip,
    UpdateAttack,
    gaussian_noise,
    scaling,
    sign_flip,
)

__all__ = [
    "ATTACK_NAMES",
    "DATA_ATTACKS",
    "UPDATE_ATTACKS",
    "GaussianNoise",
    "MaliciousClient",
    "Scaling",
    "SignFlip",
    "Trigger",
    "UpdateAttack",
    "attack_success_rate",
    "choose_malicious",
    "flip_labels",
    "gaussian_noise",
    "make_update_attack",
    "poison_with_backdoor",
    "scaling",
    "sign_flip",
    "triggered_test_set",
    "validate_attack",
]

ATTACK_NAMES: tuple[str, ...] = ("none", "sign_flip", "scaling", "gaussian", "label_flip", "backdoor")
#: Attacks on the update a client sends (built by :func:`make_update_attack`).
UPDATE_ATTACKS: tuple[str, ...] = ("sign_flip", "scaling", "gaussian")
#: Attacks on the client's training data.
DATA_ATTACKS: tuple[str, ...] = ("label_flip", "backdoor")


def _check_fraction(fraction: float) -> None:
    """Malicious fractions live in [0, 1): a federation of attackers only has nothing to defend."""
    if isinstance(fraction, bool) or not isinstance(fraction, Real) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"the fraction of malicious clients must lie in [0, 1), got {fraction!r}")


def validate_attack(name: str, fraction: float) -> None:
    """Fail early, with the valid choices, on an unknown attack name or a fraction outside [0, 1)."""
    if name not in ATTACK_NAMES:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACK_NAMES)}")
    _check_fraction(fraction)


def choose_malicious(num_clients: int, fraction: float, seed: int) -> list[str]:
    """The ids (among "0".."N-1", in numeric order) of ``round(fraction * N)`` clients picked by ``seed``."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    _check_fraction(fraction)
    count = round(float(fraction) * int(num_clients))
    chosen = np.random.default_rng(seed).choice(int(num_clients), size=count, replace=False)
    return [str(i) for i in sorted(int(c) for c in chosen)]


def make_update_attack(name: str, *, scale: float = 10.0, std: float = 1.0) -> UpdateAttack:
    """The model-poisoning attack called ``name``: ``scale`` drives sign_flip and scaling, ``std`` gaussian."""
    if name == "sign_flip":
        return SignFlip(scale)
    if name == "scaling":
        return Scaling(scale)
    if name == "gaussian":
        return GaussianNoise(std)
    valid = ", ".join(UPDATE_ATTACKS)
    if name in DATA_ATTACKS:
        raise ValueError(
            f"{name!r} is a data attack (poison the client's training set with "
            f"{'flip_labels' if name == 'label_flip' else 'poison_with_backdoor'}), not an update attack; "
            f"update attacks are {valid}"
        )
    if name == "none":
        raise ValueError(f"'none' means no attack: there is no update attack to build; update attacks are {valid}")
    raise ValueError(f"unknown update attack {name!r}; choose one of {valid} (all attacks: {', '.join(ATTACK_NAMES)})")
