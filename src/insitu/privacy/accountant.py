"""Rényi-DP accountant for the sampled Gaussian mechanism (Mironov, Talwar and Zhang 2019).

A round of DP-FedAvg (or a DP-SGD step) releases a sum of clipped contributions plus Gaussian noise
of standard deviation z * C, over a Poisson sample with rate q. Its RDP at order alpha is computed
exactly (integer alpha: the binomial expansion; fractional alpha: the paper's two convergent
series), RDP composes by addition over rounds, and (epsilon, delta) follows from the conversion of
Balle et al. (2020) minimised over a grid of orders, as Opacus and Google's dp-accounting do.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import special

DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64))
                                          + [64.0, 128.0, 256.0, 512.0, 1024.0])


def _log_add(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) without overflow."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """log(exp(a) - exp(b)) for a >= b."""
    if b == -math.inf:
        return a
    if a == b:
        return -math.inf
    return a + math.log1p(-math.exp(b - a)) if a - b < 700 else a


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log E[(p/p0)^alpha] for integer alpha: sum_k C(alpha,k) (1-q)^(alpha-k) q^k exp((k^2-k)/(2 sigma^2))."""
    total = -math.inf
    for k in range(alpha + 1):
        term = (math.log(special.binom(alpha, k)) + k * math.log(q) + (alpha - k) * math.log1p(-q)
                + (k * k - k) / (2 * sigma**2))
        total = _log_add(total, term)
    return total


def _log_erfc(x: float) -> float:
    return math.log(2) + special.log_ndtr(-x * math.sqrt(2))


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for fractional alpha: the two series of Mironov et al. (2019), Section 3.3."""
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    i = 0
    while True:
        coef = special.binom(alpha, i)
        log_coef = math.log(abs(coef))
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if coef > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        i += 1
        if max(log_s0, log_s1) < -30:
            break
    return _log_add(log_a0, log_a1)


def rdp_sampled_gaussian(q: float, noise_multiplier: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of one application of the sampled Gaussian mechanism, at each order."""
    _check(q, noise_multiplier)
    out = np.empty(len(orders))
    for i, alpha in enumerate(orders):
        if q == 0:
            out[i] = 0.0
        elif noise_multiplier == 0:
            out[i] = math.inf
        elif q == 1.0:
            out[i] = alpha / (2 * noise_multiplier**2)
        elif float(alpha).is_integer():
            out[i] = _log_a_integer(q, noise_multiplier, int(alpha)) / (alpha - 1)
        else:
            out[i] = _log_a_fractional(q, noise_multiplier, float(alpha)) / (alpha - 1)
    return out


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(q: float, noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    """Cached (read-only) per-step RDP: accountants re-sum their history every round, and clients of a
    simulation mostly share (q, z); one evaluation costs tens of milliseconds."""
    rdp = rdp_sampled_gaussian(q, noise_multiplier, orders)
    rdp.flags.writeable = False
    return rdp


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> tuple[float, float]:
    """(epsilon, best order) from RDP values via Balle et al. (2020), Theorem 21."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    best_eps, best_order = math.inf, float("nan")
    for alpha, value in zip(orders, rdp):
        if alpha <= 1 or not math.isfinite(value):
            continue
        eps = value + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        if eps < best_eps:
            best_eps, best_order = eps, alpha
    return float(max(best_eps, 0.0)), float(best_order)


def _check(q: float, noise_multiplier: float) -> None:
    if not 0 <= q <= 1:
        raise ValueError(f"sampling rate must be in [0, 1], got {q}")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")


@dataclass
class RDPAccountant:
    """Composes sampled-Gaussian steps; ``epsilon(delta)`` reports the privacy spent so far.

    ``history`` holds (noise_multiplier, sample_rate, steps) entries, merged when consecutive
    steps share their parameters, so the state stays tiny and is easy to persist.
    """

    orders: tuple[float, ...] = DEFAULT_ORDERS
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        _check(sample_rate, noise_multiplier)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            z, q, n = self.history[-1]
            self.history[-1] = (z, q, n + steps)
        elif steps:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def rdp(self) -> np.ndarray:
        total = np.zeros(len(self.orders))
        for z, q, n in self.history:
            total += n * _rdp_per_step(q, z, self.orders)
        return total

    def epsilon(self, delta: float) -> float:
        return epsilon_from_rdp(self.rdp(), delta, self.orders)[0]

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """The epsilon this accountant would report after ``steps`` more such steps."""
        rdp = self.rdp() + steps * _rdp_per_step(sample_rate, noise_multiplier, self.orders)
        return epsilon_from_rdp(rdp, delta, self.orders)[0]

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The history as one float64 array of rows (z, q, steps): persistable with the run."""
        return {"history": np.array(self.history, dtype=np.float64).reshape(-1, 3)}

    @classmethod
    def from_state_arrays(cls, arrays: dict[str, np.ndarray], orders: tuple[float, ...] = DEFAULT_ORDERS) -> RDPAccountant:
        rows = np.asarray(arrays.get("history", np.zeros((0, 3)))).reshape(-1, 3)
        return cls(orders, [(float(z), float(q), int(n)) for z, q, n in rows])


def pld_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of the same composition by privacy-loss distributions (tighter than RDP by ~10%),
    through Google's dp-accounting (``pip install dp-accounting``)."""
    try:
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant
    except ImportError:
        raise ImportError("the PLD accountant needs Google's dp-accounting: pip install dp-accounting "
                          "(or use the built-in RDP accountant)") from None
    accountant = pld_privacy_accountant.PLDAccountant()
    for z, q, n in history:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), int(n))
    return float(accountant.get_epsilon(delta))


def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` compositions of the sampled Gaussian mechanism at ``delta``."""
    accountant = RDPAccountant()
    accountant.step(noise_multiplier, sample_rate, steps)
    return accountant.epsilon(delta)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    *, tolerance: float = 0.001) -> float:
    """The smallest noise multiplier z with epsilon(z) <= target_epsilon (bisection on z)."""
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    low, high = 0.0, 1.0
    while compute_epsilon(high, sample_rate, steps, delta) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta} "
                             f"(q={sample_rate}, {steps} steps)")
    while high - low > tolerance * high:
        mid = (low + high) / 2
        if compute_epsilon(mid, sample_rate, steps, delta) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
