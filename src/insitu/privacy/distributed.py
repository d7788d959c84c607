"""Distributed DP: every client noises its own update before secure aggregation (Skellam mechanism).

With central DP over secure aggregation the server decodes the exact clipped sum and adds the noise
itself, so DP does not hold against the server. Here each sampled client clips its update to L2 norm
C, scales it by gamma, rounds it to integers (conditional randomized rounding) and adds its share of
Skellam noise, all before masking; the secure sum the server decodes already contains the noise of
every contributor, and the server only rescales it (``sum / (gamma q N)``).

Noise shares. Each client adds variance ``mu / m``, where mu = (z D2)^2 is the round's target
variance (z the noise multiplier, D2 the L2 sensitivity after rounding, in integer units) and m the
planned minimum number of contributors. If k clients' inputs reach the sum, it carries variance
``k mu / m``; the accountant charges ``min(k, m) mu / m`` (k < m: less noise than planned).

Modular clipping. The sum lives in Z_(2**32). gamma is chosen so that even the whole federation of N
clients with every clipped update on one coordinate, plus 10 standard deviations of the largest
possible noise, stays within [-2**31, 2**31): ``gamma C ~ (2**31 - 1) / (N + 10 z sqrt(N / m))``. The
sum cannot wrap unless the noise exceeds 10 standard deviations. gamma is also capped so that each
client's Poisson means stay below 2**36 (numpy's Poisson sampler is inaccurate far above), and rounded
down to a power of two.
"""

from __future__ import annotations

import functools
import math
import secrets
from dataclasses import dataclass, field

import numpy as np

from insitu.aggregation.clip import clip_in_place
from insitu.privacy import skellam
from insitu.privacy.central import check_dp_settings
from insitu.privacy.randomness import OSEntropy, RandomnessSource, SimulationSeed

PrivacyState = dict[str, np.ndarray]

HALF_FIELD = 2**31 - 1
"""Largest |sum| a two's-complement read of Z_(2**32) recovers."""

NOISE_MARGIN = 10.0
"""Standard deviations of noise kept clear of the field's edge."""


@dataclass(frozen=True)
class RoundPlan:
    """The public parameters of one distributed-DP round (what each client is told, and what is charged)."""

    clip_norm: float
    gamma: float
    client_variance: float
    mu: float  # the planned total variance, (z D2)^2
    l1: float
    l2: float
    min_contributors: int
    denominator: float  # q N: the fixed denominator of the mean
    round_index: int
    seed: int | None = None  # simulation only

    def charged_variance(self, contributors: int) -> float:
        """The noise variance the accountant charges when ``contributors`` inputs reached the sum."""
        return self.mu * min(contributors, self.min_contributors) / self.min_contributors


def gamma_for(clip_norm: float, num_clients: int, noise_multiplier: float, min_contributors: int) -> float:
    """Scale gamma such that N clipped, rounded inputs plus 10 noise standard deviations never leave the field."""
    room = num_clients + NOISE_MARGIN * noise_multiplier * math.sqrt(num_clients / min_contributors)
    gamma = HALF_FIELD / (room * 1.01) / clip_norm  # 1% for the rounding's growth of the norm
    # each client's Poisson means (z D2)^2 / (2 m) stay within what the sampler draws accurately in one call
    gamma = min(gamma, math.sqrt(2 * skellam.MAX_POISSON_MEAN * min_contributors) / noise_multiplier / clip_norm / 1.01)
    # the rounding bound adds sqrt(d)/2-ish; keep a power of two below for exact float scaling
    return float(2.0 ** math.floor(math.log2(gamma)))


def check_field(plan_n: int, gamma: float, clip_norm: float, client_variance: float, dim: int) -> None:
    """Refuse parameters whose sum over ``plan_n`` clients could wrap around the 32-bit field."""
    worst = plan_n * skellam.rounded_l2_bound(gamma * clip_norm, dim)
    worst += NOISE_MARGIN * math.sqrt(plan_n * client_variance)
    if worst > HALF_FIELD:
        raise ValueError(f"distributed DP over {plan_n} clients with gamma={gamma:g}, C={clip_norm:g} and noise "
                         f"variance {client_variance:g} per client could exceed the 32-bit field ({worst:.3g} > "
                         f"{HALF_FIELD}); lower gamma")


def client_rng(seed: int | None, round_index: int, client: int) -> np.random.Generator:
    """The generator of one client's noise and rounding: fresh OS entropy, or (simulation only) seeded.

    Deployment: numpy's PCG64 seeded with 256 bits from ``secrets`` (OS entropy) for every round; not a
    CSPRNG, but its state never leaves the client and only the noised sum is ever decoded. Simulation:
    ``default_rng([seed, round, client, 17])``, REPRODUCIBLE and NOT PRIVATE against anyone who knows the seed.
    """
    if seed is None:
        return os_entropy_rng()
    return np.random.default_rng([seed, round_index, client, 17])


def os_entropy_rng() -> np.random.Generator:
    """A deployed client's noise and rounding generator: PCG64 seeded with 256 bits of OS entropy."""
    return np.random.default_rng(secrets.randbits(256))


def distributed_input(delta: np.ndarray, *, clip_norm: float, gamma: float, client_variance: float,
                      rng: np.random.Generator) -> np.ndarray:
    """A client's integer protocol input: round(gamma clip_C(delta)) + Skellam(client_variance), and a 0.

    The trailing 0 takes the slot the FedAvg weight uses in other secure rounds (no noise there: it
    carries nothing). Rounding is conditional: repeated until the L2 norm is within
    :func:`~insitu.privacy.skellam.rounded_l2_bound`, the sensitivity the accountant charges.
    """
    if not (math.isfinite(gamma) and gamma > 0 and math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"distributed DP needs a finite gamma > 0 and clip norm > 0, got {gamma}, {clip_norm}")
    if not (math.isfinite(client_variance) and client_variance > 0):
        raise ValueError(f"distributed DP: refusing noise variance {client_variance}: each client must add noise")
    vector = np.array(delta, dtype=np.float64).ravel()  # a copy: clipped and scaled in place
    if not np.all(np.isfinite(vector)):
        raise ValueError("the update contains NaN or infinity")
    clip_in_place(vector, clip_norm)
    vector *= gamma
    bound = skellam.rounded_l2_bound(gamma * clip_norm, vector.size)
    out = np.zeros(vector.size + 1, dtype=np.int64)
    out[:-1] = skellam.conditional_rounding(vector, bound, rng)
    out[:-1] += skellam.skellam_noise(client_variance, vector.size, rng)
    return out


@functools.lru_cache(maxsize=256)
def _round_rdp(mu: float, q: float, l1: float, l2: float) -> np.ndarray:
    rdp = skellam.round_rdp(mu, q, l1, l2)
    rdp.flags.writeable = False
    return rdp


@dataclass
class DistributedDP:
    """Distributed DP-FedAvg settings and accountant: clients add Skellam noise shares before SecAgg.

    Needs secure aggregation (the strategy refuses it without). ``sample_rate`` q is each client's
    Poisson sampling probability; ``min_contributors`` m is the number of clients whose noise shares
    make up the full noise (default: the expected cohort q N minus two standard deviations, at least
    2). ``randomness`` draws the Poisson sample in the round loop; with ``SimulationSeed(seed)`` the
    simulated clients' noise is seeded too (reproducible, simulation only, NOT private against anyone
    who knows the seed). A deployed client always draws its noise from OS entropy, whatever the server
    sends. ``record_client_metrics`` as in :class:`~insitu.privacy.central.CentralDP`.
    """

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    delta: float = 1e-5
    target_epsilon: float | None = None
    min_contributors: int | None = None
    randomness: RandomnessSource = field(default_factory=OSEntropy)
    record_client_metrics: bool = False

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"distributed DP needs noise: noise_multiplier must be > 0, got {self.noise_multiplier}")
        check_dp_settings(self.clip_norm, self.sample_rate, self.delta, self.target_epsilon)
        if self.min_contributors is not None and self.min_contributors < 1:
            raise ValueError(f"min_contributors must be >= 1, got {self.min_contributors}")

    # -- planning ---------------------------------------------------------------------------
    def planned_contributors(self, num_clients: int) -> int:
        """m: the given setting, or the expected cohort minus two standard deviations (at least 2)."""
        if self.min_contributors is not None:
            return self.min_contributors
        expected = self.sample_rate * num_clients
        return max(2, math.floor(expected - 2 * math.sqrt(expected * (1 - self.sample_rate))))

    def check_clients(self, num_clients: int) -> None:
        """Refuse a federation the 32-bit field cannot hold at this clip norm and noise."""
        m = self.planned_contributors(num_clients)
        gamma = gamma_for(self.clip_norm, num_clients, self.noise_multiplier, m)
        if gamma * self.clip_norm < 1:
            raise ValueError(f"distributed DP over {num_clients} clients leaves gamma C = {gamma * self.clip_norm:g} "
                             "< 1 in a 32-bit field: too many clients for integer precision")

    def plan(self, state: PrivacyState, num_clients: int, dim: int) -> RoundPlan:
        """This round's public parameters for a model of ``dim`` values in a federation of ``num_clients``.

        A pure function of its arguments: the round loop, the network round and the accounting of a
        failed round all recompute the same plan, and nothing is remembered between rounds."""
        m = self.planned_contributors(num_clients)
        gamma = gamma_for(self.clip_norm, num_clients, self.noise_multiplier, m)
        l1, l2 = skellam.sensitivities(gamma * self.clip_norm, dim)
        mu = (self.noise_multiplier * l2) ** 2
        seed = self.randomness.seed if isinstance(self.randomness, SimulationSeed) else None
        return RoundPlan(self.clip_norm, gamma, mu / m, mu, l1, l2, m, self.sample_rate * num_clients,
                         self._release_index(state), seed)

    # -- accounting -------------------------------------------------------------------------
    def init_state(self) -> PrivacyState:
        return {"history": np.zeros((0, 5)), "clip_norm": np.array([self.clip_norm])}

    @staticmethod
    def _rows(state: PrivacyState) -> np.ndarray:
        return np.asarray(state.get("history", np.zeros((0, 5))), dtype=np.float64).reshape(-1, 5)

    def rdp(self, state: PrivacyState) -> np.ndarray:
        """Accumulated RDP over :data:`~insitu.privacy.skellam.ORDERS`; rows are (mu, q, D1, D2, rounds)."""
        total = np.zeros(len(skellam.ORDERS))
        for mu, q, l1, l2, n in self._rows(state):
            total += n * _round_rdp(float(mu), float(q), float(l1), float(l2))
        return total

    def epsilon(self, state: PrivacyState) -> float:
        return skellam.epsilon(self.rdp(state), self.delta)

    def epsilon_against_server(self, state: PrivacyState, rounds_taken_part: int) -> float:
        """Epsilon against the server for a client that took part in ``rounds_taken_part`` rounds.

        The server knows who took part, so sampling does not amplify against it: each such round costs the
        un-subsampled Skellam RDP (at the round's charged variance; the largest-cost row is used).
        """
        rows = self._rows(state)
        if rounds_taken_part <= 0 or not len(rows):
            return 0.0
        worst = max((_round_rdp(float(mu), 1.0, float(l1), float(l2)) for mu, _, l1, l2, _ in rows),
                    key=lambda r: float(r.sum()))
        return skellam.epsilon(rounds_taken_part * worst, self.delta)

    def stop_reason(self, state: PrivacyState) -> str | None:
        """Why no further round may run (one more round at full noise would pass the target), or None.

        The check assumes the next round reaches m contributors; one with fewer is charged more, so the
        last round can end above the target by that difference.
        """
        if self.target_epsilon is None:
            return None
        rows = self._rows(state)
        if len(rows):  # the last round's sensitivities at its full planned noise (z D2)^2, not a short round's
            _, q, l1, l2, _ = rows[-1]
            nxt = _round_rdp(float((self.noise_multiplier * l2) ** 2), float(q), float(l1), float(l2))
        else:  # nothing spent yet: the Gaussian limit of the first round (the discreteness terms are ~1e-10)
            z = self.noise_multiplier
            nxt = skellam.round_rdp(z * z * 1e12, self.sample_rate, 0.0, 1e6)
        after = skellam.epsilon(self.rdp(state) + nxt, self.delta)
        if after > self.target_epsilon:
            return (f"privacy budget reached: one more round would bring epsilon from {self.epsilon(state):.3f} "
                    f"to {after:.3f} > target {self.target_epsilon} (delta {self.delta}, distributed DP)")
        return None

    def after_round(self, state: PrivacyState, plan: RoundPlan, *, contributors: int) -> PrivacyState:
        """The state after the round run under ``plan``, in which ``contributors`` clients' noised inputs
        reached the sum. Charged: Skellam of variance min(k, m) mu / m (k < m: shares never added)."""
        return self._charge(state, plan.charged_variance(int(contributors)), plan)

    def after_failed_round(self, state: PrivacyState, num_clients: int, dim: int) -> PrivacyState:
        """A round that failed: counted at this round's full planned noise, whoever was sampled (whether a
        round fails can depend on the sample), even when it failed before it was planned."""
        plan = self.plan(state, num_clients, dim)
        return self._charge(state, plan.mu, plan)

    @staticmethod
    def _release_index(state: PrivacyState) -> int:
        """The number of this round's release: rounds charged so far + 1 (persisted, so it survives a resume)."""
        history = np.asarray(state.get("history", np.zeros((0, 5))))
        return int(history[:, 4].sum()) + 1 if len(history) else 1

    def _charge(self, state: PrivacyState, variance: float, plan: RoundPlan) -> PrivacyState:
        row = np.array([[variance, self.sample_rate, plan.l1, plan.l2, 1.0]])
        rows = self._rows(state)
        if len(rows) and np.array_equal(rows[-1, :4], row[0, :4]):
            rows = rows.copy()
            rows[-1, 4] += 1
        else:
            rows = np.concatenate([rows, row])
        return {"history": rows, "clip_norm": np.array([self.clip_norm])}
