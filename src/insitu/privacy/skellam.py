"""The Skellam mechanism's math (Agarwal, Kairouz and Liu, NeurIPS 2021): noise, rounding, Rényi DP.

Distributed DP over secure aggregation works on integers. A client clips its update to L2 norm C,
scales it by gamma, rounds it to integers (conditional randomized rounding, which bounds the
rounded vector's L2 norm by :func:`rounded_l2_bound`), and adds symmetric Skellam noise
``Poisson(v/2) - Poisson(v/2)`` (variance v) to every coordinate. Skellam noise is closed under
summation: shares of variance v_1, ..., v_k add up to one Skellam of variance v_1 + ... + v_k, so the
secure sum carries exactly the noise the clients added, with no slack.

Privacy of one release of a sum with Skellam noise of variance ``mu`` and integer-domain sensitivities
D1 (L1) and D2 (L2) (Agarwal et al. 2021, Theorem 3.5 written with mu the *variance*):

    eps(alpha) <= alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D2 / (2 mu)).

The first term is the Gaussian mechanism's RDP at the same variance; the second is the (small, for
the mu used in practice) price of discreteness. Client sampling with probability q is amplified with
Zhu and Wang (2019), "Poisson subsampled Rényi DP", Theorem 6, the general upper bound that holds for
any mechanism (integer orders only):

    eps_q(alpha) <= 1/(alpha-1) log[(1-q)^(alpha-1) (1 + (alpha-1) q)
                                   + C(alpha,2) q^2 (1-q)^(alpha-2) e^(eps(2))
                                   + 3 sum_{l=3..alpha} C(alpha,l) q^l (1-q)^(alpha-l) e^((l-1) eps(l))].

RDP composes by addition over rounds and converts to (epsilon, delta) with Balle et al. (2020), as in
:mod:`insitu.privacy.accountant`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import special  # type: ignore[import-untyped]

from insitu.privacy.accountant import epsilon_from_rdp

__all__ = ["ORDERS", "conditional_rounding", "epsilon", "rounded_l2_bound", "sensitivities", "skellam_noise",
           "skellam_rdp", "subsampled_rdp"]

ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (80, 96, 128, 192, 256)
"""Integer Rényi orders (the amplification bound needs integers)."""

ROUNDING_BETA = math.exp(-0.5)
"""beta of the conditional rounding bound (Kairouz et al. 2021 use the same): a retry is rarely needed."""


def rounded_l2_bound(scaled_norm: float, dim: int, beta: float = ROUNDING_BETA) -> float:
    """Upper bound on the L2 norm of a conditionally rounded vector whose norm before rounding is <= scaled_norm.

    sqrt(c^2 + d/4 + sqrt(2 log(1/beta)) (c + sqrt(d)/2)) (Kairouz, Liu, Steinke 2021, Thm. 3 / Agarwal
    et al. 2021): randomized rounding meets it with probability >= 1 - beta; rounding is repeated until it
    does, so the bound holds for every vector a client sends.
    """
    if not scaled_norm >= 0 or dim < 1 or not 0 < beta < 1:
        raise ValueError(f"need scaled_norm >= 0, dim >= 1 and beta in (0, 1); got {scaled_norm}, {dim}, {beta}")
    c = float(scaled_norm)
    return math.sqrt(c * c + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(dim) / 2))


def sensitivities(scaled_norm: float, dim: int) -> tuple[float, float]:
    """(D1, D2) in the integer domain: D2 from :func:`rounded_l2_bound`, D1 = min(sqrt(d) D2, D2^2).

    D1 <= D2^2 because every nonzero integer coordinate has |v_i| <= v_i^2.
    """
    d2 = rounded_l2_bound(scaled_norm, dim)
    return min(math.sqrt(dim) * d2, d2 * d2), d2


def conditional_rounding(x: np.ndarray, bound: float, rng: np.random.Generator, max_tries: int = 1000) -> np.ndarray:
    """Randomized rounding (unbiased: floor(x) + Bernoulli(frac(x))), repeated until ||result||_2 <= bound."""
    x = np.asarray(x, dtype=np.float64)
    low = np.floor(x)
    frac = x - low
    for _ in range(max_tries):
        rounded = low + (rng.random(x.shape) < frac)
        if float(np.dot(rounded, rounded)) <= bound * bound:
            return rounded.astype(np.int64)
    raise ValueError(f"randomized rounding did not meet the L2 bound {bound:g} in {max_tries} tries: the input's "
                     "norm exceeds what the bound was computed for")


MAX_POISSON_MEAN = 2.0**36
"""Largest Poisson mean drawn in one call. numpy's sampler loses accuracy for very large means (measured: the
standard deviation of a Skellam draw is 2% off at a Poisson mean of 1e15, 20% off at 2.25e15, exact within
0.2% up to 1e12); larger means are drawn as sums of smaller Poissons, which is exact (Poissons add)."""

MAX_POISSON_PARTS = 16


def skellam_noise(variance: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of symmetric Skellam noise with this variance: Poisson(v/2) - Poisson(v/2), int64."""
    if not (variance >= 0 and math.isfinite(variance)):
        raise ValueError(f"Skellam variance must be finite and >= 0, got {variance}")
    if variance == 0:
        return np.zeros(size, dtype=np.int64)
    parts = math.ceil(variance / 2 / MAX_POISSON_MEAN)
    if parts > MAX_POISSON_PARTS:
        raise ValueError(f"Skellam variance {variance:.3g} needs Poisson means above {MAX_POISSON_MEAN:.3g} x "
                         f"{MAX_POISSON_PARTS}, where sampling is slow or inaccurate: lower the scale gamma")
    mean = variance / 2 / parts
    out = np.zeros(size, dtype=np.int64)
    for _ in range(parts):
        out += rng.poisson(mean, size).astype(np.int64)
        out -= rng.poisson(mean, size).astype(np.int64)
    return out


def skellam_rdp(alpha: float, mu: float, l1: float, l2: float) -> float:
    """RDP at order alpha of a sum released with Skellam noise of variance mu, sensitivities (l1, l2)."""
    if not mu > 0:
        return math.inf
    gaussian = alpha * l2 * l2 / (2 * mu)
    return gaussian + min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l2 / (2 * mu))


def subsampled_rdp(q: float, rdp: Callable[[int], float], alpha: int) -> float:
    """Zhu and Wang (2019), Thm 6: RDP at integer order alpha >= 2 of ``rdp``'s mechanism under Poisson sampling q."""
    if not 0 <= q <= 1:
        raise ValueError(f"sampling rate must be in [0, 1], got {q}")
    if int(alpha) != alpha or alpha < 2:
        raise ValueError(f"the general amplification bound needs an integer order >= 2, got {alpha}")
    alpha = int(alpha)
    if q == 0:
        return 0.0
    if q == 1:
        return rdp(alpha)
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = [(alpha - 1) * log_1q + math.log1p((alpha - 1) * q),
             math.log(special.comb(alpha, 2, exact=True)) + 2 * log_q + (alpha - 2) * log_1q + rdp(2)]
    for order in range(3, alpha + 1):
        terms.append(math.log(3) + math.log(special.comb(alpha, order, exact=True)) + order * log_q
                     + (alpha - order) * log_1q + (order - 1) * rdp(order))
    return float(special.logsumexp(terms)) / (alpha - 1)


def round_rdp(mu: float, q: float, l1: float, l2: float, orders: Sequence[int] = ORDERS) -> np.ndarray:
    """RDP vector (over ``orders``) of one round: Skellam noise of variance mu, Poisson sampling q."""
    return np.array([subsampled_rdp(q, lambda a: skellam_rdp(a, mu, l1, l2), a) for a in orders])


def epsilon(rdp: np.ndarray, delta: float, orders: Sequence[int] = ORDERS) -> float:
    """(epsilon, delta) from an accumulated RDP vector over ``orders`` (Balle et al. 2020)."""
    return epsilon_from_rdp(np.asarray(rdp, dtype=np.float64), delta, [float(a) for a in orders])[0]
