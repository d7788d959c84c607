"""Secure aggregation settings, and the math both ends of a secure round share.

A client's input to the protocol is its update delta, weighted for FedAvg (``[w s delta, w s]``
with a public scale s) or, under central DP, clipped to L2 norm C with a final coordinate saying
whether clipping left it unchanged (adaptive clipping's count, learned only as a sum). The server
decodes the protocol's sum into the round's mean delta. :class:`SecureMean` runs the whole protocol
in-process for simulation (with optional dropouts); over gRPC the round loop runs it message by
message (:mod:`insitu.run.secure_round`, client side :mod:`insitu.privacy.secagg.participant`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from insitu.aggregation.base import AggregationAssumptionError, EmptyAggregationError
from insitu.aggregation.transforms import l2_norm
from insitu.privacy.distributed import (
    RoundPlan,
    client_rng,
    decode_distributed_sum,
    distributed_input,
)
from insitu.privacy.randomness import Generator, SecureRandom
from insitu.privacy.secagg.encoding import split_weighted, with_weight
from insitu.privacy.secagg.protocol import SecAggConfig
from insitu.privacy.secagg.simulate import RoundReport, run_round

log = logging.getLogger("insitu")


def weight_scale(max_weight: float, bound: float) -> float:
    """The public FedAvg weight scale s = min(1, B) / max weight: every w s lies in (0, min(1, B)]."""
    if not max_weight > 0:
        raise ValueError(f"the largest client weight must be positive, got {max_weight}")
    return min(1.0, bound) / max_weight


def secure_input(delta: np.ndarray, *, bound: float, weight: float | None = None,
                 clip_norm: float | None = None) -> np.ndarray:
    """A client's protocol input: ``[w delta, w]`` (FedAvg), or under DP ``[clip_C(delta), B * unclipped]``.

    Exactly one of ``weight`` (already scaled by :func:`weight_scale`) and ``clip_norm`` is given.
    """
    if (weight is None) == (clip_norm is None):
        raise ValueError("give exactly one of weight (FedAvg) and clip_norm (DP-FedAvg)")
    if weight is not None:
        return with_weight(delta, weight)
    vector = np.asarray(delta, dtype=np.float64).ravel()
    norm = l2_norm(vector)
    if norm > clip_norm:
        vector = vector * (clip_norm / norm)
    return np.concatenate([vector, [bound if norm <= clip_norm else 0.0]])


def decode_secure_sum(total: np.ndarray, *, bound: float, dp: bool, noise_std: float = 0.0,
                      denominator: float = 1.0, rng: Generator | None = None) -> tuple[np.ndarray, int]:
    """(mean delta as float32, number of unclipped clients) from the protocol's sum of :func:`secure_input`.

    FedAvg: sum(w delta) / sum(w). DP: (clipped sum + N(0, noise_std^2)) / denominator, and the
    count of updates that needed no clipping (adaptive clipping's signal).
    """
    if not dp:
        return split_weighted(total, np.float32), 0
    mean = np.empty(total.size - 1, dtype=np.float32)  # divided straight into float32: no model-sized temporary
    unclipped = int(round(float(total[-1]) / bound))
    noisy = (rng or SecureRandom()).normal(0.0, noise_std, size=mean.size) if noise_std > 0 else np.zeros(mean.size)
    noisy += total[:-1]
    np.divide(noisy, denominator, out=mean, casting="same_kind")
    return mean, unclipped


@dataclass
class SecureBuffer:
    updates: list[np.ndarray] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    unclipped: int = 0  # known only once the sum is decoded
    contributors: int = 0  # distributed DP: clients whose noised input reached the sum


@dataclass
class SecureAggregation:
    """Settings: element bound B of the fixed-point encoding, the threshold, dropouts to simulate.

    ``threshold_fraction`` sets t = max(floor(n x fraction) + 1, floor(n / 2) + 1) of the round's n
    clients; ``degree`` (even) switches to SecAgg+ neighbour groups of that many. In simulation,
    ``dropout_fraction`` of the clients go silent after sending their masked input (their input
    still counts: the server reconstructs their self-masks from the others' shares).
    """

    bound: float = 10.0
    threshold_fraction: float = 0.5
    dropout_fraction: float = 0.0
    seed: int | None = None
    degree: int | None = None
    last_report: RoundReport | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.bound > 0:
            raise ValueError(f"secure aggregation bound must be > 0, got {self.bound}")
        if not 0.5 <= self.threshold_fraction < 1:
            raise ValueError(f"threshold_fraction must be in [0.5, 1): below half the clients the server could "
                             f"unmask individual updates; got {self.threshold_fraction}")
        if not 0 <= self.dropout_fraction < 1:
            raise ValueError(f"dropout_fraction must be in [0, 1), got {self.dropout_fraction}")

    def threshold(self, n: int) -> int:
        """t for a round of n clients (within each client's group of degree + 1 under SecAgg+)."""
        size = n if self.degree is None else self.degree + 1
        return max(int(size * self.threshold_fraction) + 1, size // 2 + 1)

    def protocol_config(self, n: int, dim: int, session: int, *, integer: bool = False) -> SecAggConfig:
        """The public parameters of one round of n clients over vectors of length dim (integer: distributed DP)."""
        return SecAggConfig(n, self.threshold(n), dim, self.bound, session=session, degree=self.degree,
                            integer=integer)

    def reducer(self, *, clip_norm: float | None = None, noise_std: float = 0.0,
                denominator: float | None = None, rng: Generator | None = None,
                distributed: Callable[[int], RoundPlan] | None = None) -> SecureMean:
        """A fresh reducer: weighted mean, (with ``clip_norm``) DP-FedAvg's clipped noisy mean, or (with
        ``distributed``, which gives the round's plan for a model of d values) the mean of inputs each client
        clipped, rounded and noised itself (distributed DP)."""
        return SecureMean(self, clip_norm, noise_std, denominator, rng, distributed)


class SecureMean:
    """Weighted mean (or clipped sum + noise / denominator) computed through one in-process SecAgg round."""

    streaming = False
    shift_equivariant = False
    min_updates = 2

    def __init__(self, settings: SecureAggregation, clip_norm: float | None, noise_std: float,
                 denominator: float | None, rng: Generator | None = None,
                 distributed: Callable[[int], RoundPlan] | None = None) -> None:
        self.settings, self.clip_norm, self.noise_std, self.denominator = settings, clip_norm, noise_std, denominator
        self.rng = rng
        self.planner = distributed
        self.plan: RoundPlan | None = None

    def start(self, dim: int) -> SecureBuffer:
        if self.planner is not None:
            self.plan = self.planner(dim)
        return SecureBuffer()

    def add(self, acc: SecureBuffer, update: np.ndarray, weight: float) -> SecureBuffer:
        acc.updates.append(np.asarray(update, dtype=np.float64))
        acc.weights.append(float(weight))
        return acc

    def finish(self, acc: SecureBuffer) -> np.ndarray:
        n = len(acc.updates)
        if n == 0:
            raise EmptyAggregationError("no updates to aggregate securely")
        if n < 2:
            raise AggregationAssumptionError(f"secure aggregation needs at least 2 updates, got {n}: a sum of one "
                                             "is that client's update")
        settings = self.settings
        rng = np.random.default_rng(settings.seed)
        if self.plan is not None:
            return self._finish_distributed(acc, rng)
        dp = self.clip_norm is not None
        bound = settings.bound
        scale = weight_scale(max(acc.weights), bound)
        inputs = {i + 1: secure_input(u, bound=bound, clip_norm=self.clip_norm) if dp
                  else secure_input(u, bound=bound, weight=w * scale)
                  for i, (u, w) in enumerate(zip(acc.updates, acc.weights))}
        acc.updates.clear()
        config = settings.protocol_config(n, len(inputs[1]), session=int(rng.integers(2**63)))
        drop = rng.choice(np.arange(1, n + 1), size=int(settings.dropout_fraction * n), replace=False)
        report = run_round(config, inputs, drop_before={"unmask": [int(c) for c in drop]})
        settings.last_report = report
        if report.n_clipped:
            log.warning("secure aggregation: %d values outside [-%g, %g] were clipped; raise the bound",
                        report.n_clipped, bound, bound)
        mean, acc.unclipped = decode_secure_sum(report.total, bound=bound, dp=dp, noise_std=self.noise_std,
                                                denominator=self.denominator or n, rng=self.rng)
        return mean

    def _finish_distributed(self, acc: SecureBuffer, rng: np.random.Generator) -> np.ndarray:
        """Distributed DP: every simulated client noises its own integer input; the server decodes the noised sum."""
        plan = self.plan
        assert plan is not None
        n = len(acc.updates)
        inputs = {i + 1: distributed_input(u, clip_norm=plan.clip_norm, gamma=plan.gamma,
                                           client_variance=plan.client_variance,
                                           rng=client_rng(plan.seed, plan.round_index, i + 1))
                  for i, u in enumerate(acc.updates)}
        acc.updates.clear()
        config = self.settings.protocol_config(n, len(inputs[1]), session=int(rng.integers(2**63)), integer=True)
        drop = rng.choice(np.arange(1, n + 1), size=int(self.settings.dropout_fraction * n), replace=False)
        report = run_round(config, inputs, drop_before={"unmask": [int(c) for c in drop]})
        self.settings.last_report = report
        acc.contributors = len(report.included)
        return decode_distributed_sum(report.total, plan)
