"""Central (user-level) differential privacy: DP-FedAvg (McMahan et al. 2018).

Each round every sampled client's update is clipped to L2 norm C, the clipped updates are summed,
Gaussian noise N(0, (z C)^2) is added to the sum, and the result is divided by the *expected*
number of clients q N (the fixed-denominator estimator), so one client's presence changes the
released value by at most C / (q N) and the sampled Gaussian mechanism's accountant applies.
Clients are Poisson-sampled with rate q, which is what that analysis assumes. Every client counts
once (user-level privacy), whatever its number of examples.

Adaptive clipping (Andrew et al. 2021) moves C towards the ``target_quantile`` of update norms
with a geometric step, from a noised *centred* count sum_i (b_i - 1/2) of the unclipped clients
(sensitivity 1/2); the noise of the update sum is then raised so that both releases together cost
what ``noise_multiplier`` alone would: (z_sum)^-2 + (2 sigma_b)^-2 = z^-2.

Every round is released and accounted, whoever was sampled: a round with no sampled client releases
noise / (q N), and a round whose aggregation failed is still counted (conservatively). The noise
comes from ``randomness``: OS entropy through a CSPRNG (the default; a deployment's only choice), or
:class:`~insitu.privacy.randomness.SimulationSeed` for reproducible simulations, which is not private
against anyone who knows the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from insitu.aggregation import Pipeline, clip, gaussian_noise, pipeline, scale, total
from insitu.aggregation.pipeline import PostStage
from insitu.privacy.accountant import RDPAccountant, pld_epsilon
from insitu.privacy.randomness import (
    Generator,
    OSEntropy,
    RandomnessSource,
)

PrivacyState = dict[str, np.ndarray]


def gaussian_mean(clip_norm: float, noise_std: float, denominator: float, rng: Generator | None = None) -> Pipeline:
    """DP-FedAvg's release as one pipeline: clip each update to ``clip_norm``, sum (weights ignored:
    every client counts once), add N(0, noise_std^2), divide by ``denominator``.

    Streaming (O(model) memory). With no update at all the release is the noise alone, divided the
    same way: under DP a round is released whoever was sampled. ``rng``: OS entropy by default.
    """
    return pipeline(pre=[clip(clip_norm)], reduce=total(),
                    post=[gaussian_noise(noise_std, clip_norm, rng), scale(1.0 / denominator)])


def check_dp_settings(clip_norm: float, sample_rate: float, delta: float, target_epsilon: float | None) -> None:
    """Refuse DP settings out of range (shared by central and distributed DP), naming the setting."""
    if target_epsilon is not None and not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@dataclass
class CentralDP:
    """DP-FedAvg settings and bookkeeping: noise, clipping (fixed or adaptive), accountant, budget.

    ``sample_rate`` q is the Poisson sampling probability of each client per round (the strategy's
    ``fraction_fit``). With ``target_epsilon`` set, no round starts that would end above it.

    ``randomness`` draws the noise (and, in the round loop, the Poisson sample): ``OSEntropy()``
    by default; ``SimulationSeed(seed)`` is reproducible, simulation only, and not private against
    anyone who knows the seed. Seeded draws are keyed by (release number, purpose), never by a
    counter, so a resumed run does not reuse noise.

    ``record_client_metrics``: epsilon covers only the released models. By default the round loop
    therefore records nothing per client under DP (who was sampled, how many, their losses and
    example counts, federated evaluation); True keeps them, NOT covered by epsilon.
    """

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    delta: float = 1e-5
    target_epsilon: float | None = None
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise_fraction: float = 0.05  # sigma_b = this x expected clients (Andrew et al. use 1/20)
    accountant_kind: str = "rdp"  # "rdp" (built in) or "pld" (tighter, needs dp-accounting)
    randomness: RandomnessSource = field(default_factory=OSEntropy)
    record_client_metrics: bool = False  # True: per-client facts are recorded, NOT covered by epsilon

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and self.noise_multiplier == 0:
            raise ValueError("a target epsilon needs noise: noise_multiplier 0 gives no privacy guarantee")
        check_dp_settings(self.clip_norm, self.sample_rate, self.delta, self.target_epsilon)
        if self.accountant_kind not in ("rdp", "pld"):
            raise ValueError(f"accountant must be 'rdp' or 'pld', got {self.accountant_kind!r}")
        if self.adaptive and not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")

    # -- state -------------------------------------------------------------------------------
    def init_state(self) -> PrivacyState:
        return {"history": np.zeros((0, 3)), "clip_norm": np.array([self.clip_norm])}

    def accountant(self, state: PrivacyState) -> RDPAccountant:
        return RDPAccountant.from_state_arrays(state)

    def epsilon(self, state: PrivacyState) -> float:
        return self._epsilon(self.accountant(state))

    def _epsilon(self, accountant: RDPAccountant) -> float:
        if self.accountant_kind == "pld":
            return pld_epsilon(accountant.history, self.delta)
        return accountant.epsilon(self.delta)

    def stop_reason(self, state: PrivacyState) -> str | None:
        """Why no further round may run (the budget would be exceeded), or None."""
        if self.target_epsilon is None:
            return None
        next_round = self.accountant(state)
        next_round.step(self.noise_multiplier, self.sample_rate, 1)
        after = self._epsilon(next_round)
        if after > self.target_epsilon:
            return (f"privacy budget reached: one more round would bring epsilon from "
                    f"{self.epsilon(state):.3f} to {after:.3f} > target {self.target_epsilon} (delta {self.delta})")
        return None

    def check_clients(self, num_clients: int) -> None:
        """Refuse a federation too small for adaptive clipping's count noise at this noise level."""
        if self.adaptive and self.noise_multiplier > 0 and self._update_noise_multiplier(self.sample_rate * num_clients) is None:
            raise ValueError(f"adaptive clipping with {num_clients} clients x q={self.sample_rate}: the noised clip "
                             f"count would use up the whole privacy budget of noise_multiplier "
                             f"{self.noise_multiplier}; raise the noise or count_noise_fraction, or use more clients")

    # -- one round ---------------------------------------------------------------------------
    def _update_noise_multiplier(self, expected: float) -> float | None:
        """z for the update sum such that it and the clip count together cost ``noise_multiplier``.

        The count release sum_i (b_i - 1/2) + N(0, sigma_b^2) has sensitivity 1/2, so its noise
        multiplier is 2 sigma_b; two Gaussian releases compose as one of z^-2 = z_sum^-2 + (2 sigma_b)^-2.
        """
        if not self.adaptive:
            return self.noise_multiplier
        inv = self.noise_multiplier**-2 - (2 * self.count_noise_std(expected)) ** -2
        return inv**-0.5 if inv > 0 else None

    def count_noise_std(self, expected: float) -> float:
        """sigma_b, the noise std on the centred clip count (Andrew et al.: expected clients / 20)."""
        return self.count_noise_fraction * expected

    def mechanism(self, state: PrivacyState, num_clients: int) -> tuple[float, float, float]:
        """This round's (clip norm, noise std on the sum, fixed denominator q N)."""
        expected = self.sample_rate * num_clients
        clip = float(state["clip_norm"][0])
        z = self._update_noise_multiplier(expected) if self.noise_multiplier > 0 else 0.0
        if z is None:
            self.check_clients(num_clients)
        return clip, (z or 0.0) * clip, expected

    def release(self, state: PrivacyState, num_clients: int) -> list[PostStage]:
        """This round's post-stages on the clipped sum: N(0, (z C)^2) noise, then division by q N."""
        clip_norm, noise_std, denominator = self.mechanism(state, num_clients)
        return [gaussian_noise(noise_std, clip_norm, self.noise_rng(state, "update")), scale(1.0 / denominator)]

    def after_round(self, state: PrivacyState, acc_unclipped: int, num_clients: int, *,
                    contributors: int) -> PrivacyState:
        """The new state after one released round: accountant stepped, clip norm adapted.

        ``acc_unclipped`` of the round's ``contributors`` updates were within the clip norm. Adaptive
        clipping releases the centred count sum_i (b_i - 1/2) + N(0, sigma_b^2) = unclipped -
        contributors / 2 + noise (sensitivity 1/2, as accounted), then adds back the public q N / 2.
        """
        accountant = self.accountant(state)
        accountant.step(self.noise_multiplier, self.sample_rate, 1)
        clip = float(state["clip_norm"][0])
        if self.adaptive:
            expected = self.sample_rate * num_clients
            noise = float(self.noise_rng(state, "clip_count").normal(0.0, self.count_noise_std(expected)))
            centred = acc_unclipped - contributors / 2 + noise  # the released value
            noisy_fraction = (centred + expected / 2) / expected
            clip *= math.exp(-self.clip_lr * (noisy_fraction - self.target_quantile))
        return {**accountant.state_arrays(), "clip_norm": np.array([clip])}

    def after_failed_round(self, state: PrivacyState, num_clients: int = 0, dim: int = 0) -> PrivacyState:
        """A round whose aggregation failed: counted all the same (conservative), clip norm kept.
        (``num_clients`` and ``dim`` size distributed DP's plan; central DP's step does not need them.)

        Whether a round fails can depend on who was sampled; counting it keeps epsilon an upper bound.
        """
        accountant = self.accountant(state)
        accountant.step(self.noise_multiplier, self.sample_rate, 1)
        return {**state, **accountant.state_arrays()}

    def release_index(self, state: PrivacyState) -> int:
        """The number of the next release: rounds accounted so far + 1 (the round number, as every
        round is accounted). It is part of the persisted state, so it survives a resume."""
        return self.accountant(state).steps + 1

    def noise_rng(self, state: PrivacyState, purpose: str) -> Generator:
        """The generator for one release's ``purpose`` ("update" or "clip_count").

        OS entropy by default; with ``SimulationSeed`` keyed by (seed, release number, purpose), so
        the same round always draws the same noise and no noise is ever reused across rounds.
        """
        return self.randomness.generator(self.release_index(state), purpose)
