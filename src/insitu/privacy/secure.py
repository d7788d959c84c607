"""Secure aggregation settings, and the math both ends of a secure round share.

A client's input to the protocol is its update delta, weighted for FedAvg (``[w s delta, w s]``
with a public scale s), under central DP clipped to L2 norm C with a final coordinate saying
whether clipping left it unchanged (adaptive clipping's count, learned only as a sum), or under
distributed DP clipped, scaled, rounded and noised by the client itself. :class:`SecureSum` is the
pipeline's reduction: in simulation it runs the whole protocol in-process (with optional dropouts);
over gRPC the secure-aggregation round protocol runs it message by message (:mod:`insitu.protocols.secagg`,
server and client halves) and finishes the round from the decoded sum with the same
``decode`` (:meth:`insitu.strategies.Strategy.aggregate_secure_sum`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from insitu.aggregation.base import AggregationAssumptionError, EmptyAggregationError, Properties, Report
from insitu.aggregation.clip import clip_in_place
from insitu.privacy.distributed import RoundPlan, client_rng, distributed_input
from insitu.privacy.secagg.encoding import split_weighted, with_weight
from insitu.privacy.secagg.protocol import SecAggConfig
from insitu.privacy.secagg.simulate import run_round

log = logging.getLogger("insitu")

PROTOCOL_METRICS = ("contributors", "secagg_bytes_sent", "secagg_clipped_values")
"""What a simulated secure sum reports: inputs that reached the sum, bytes the clients sent, and
values outside [-B, B] that the fixed-point encoding clipped."""


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
    assert clip_norm is not None
    vector = np.array(delta, dtype=np.float64).ravel()  # a copy: clipped in place
    within = clip_in_place(vector, clip_norm)
    return np.concatenate([vector, [bound if within else 0.0]])


class Encoding(Protocol):
    """What the clients send into the secure sum, and how the server reads the sum back."""

    properties: Properties
    integer: bool

    def encode(self, updates: list[np.ndarray], weights: list[float], bound: float) -> dict[int, np.ndarray]:
        """The protocol inputs of clients 1..n (simulation: the server plays every client)."""

    def decode(self, total: np.ndarray, bound: float) -> tuple[np.ndarray, Report]:
        """The reduced vector (float32) and report from the protocol's sum."""


class WeightedInputs:
    """FedAvg: ``[w s delta, w s]`` in, sum(w delta) / sum(w) out."""

    properties = Properties(linear=True, uses_weights=True, min_updates=2, hides_inputs=True)
    integer = False

    def encode(self, updates: list[np.ndarray], weights: list[float], bound: float) -> dict[int, np.ndarray]:
        scale = weight_scale(max(weights), bound)
        return {i + 1: secure_input(u, bound=bound, weight=w * scale) for i, (u, w) in enumerate(zip(updates, weights))}

    def decode(self, total: np.ndarray, bound: float) -> tuple[np.ndarray, Report]:
        return split_weighted(total, np.float32), {}


class ClippedInputs:
    """Central DP: ``[clip_C(delta), B * within]`` in; the clipped sum and the count within the clip out.
    Weights are ignored (every client counts once); the noise is the pipeline's next stage."""

    integer = False

    def __init__(self, clip_norm: float) -> None:
        self.clip_norm = float(clip_norm)
        self.properties = Properties(linear=True, min_updates=2, sensitivity=self.clip_norm, hides_inputs=True,
                                     metrics=("within_clip",))

    def encode(self, updates: list[np.ndarray], weights: list[float], bound: float) -> dict[int, np.ndarray]:
        return {i + 1: secure_input(u, bound=bound, clip_norm=self.clip_norm) for i, u in enumerate(updates)}

    def decode(self, total: np.ndarray, bound: float) -> tuple[np.ndarray, Report]:
        return total[:-1].astype(np.float32), {"within_clip": round(float(total[-1]) / bound)}


class DistributedInputs:
    """Distributed DP: each client's integer input is round(gamma clip_C(delta)) + its Skellam share;
    the sum / gamma comes out, noise included (the fixed denominator is the pipeline's next stage)."""

    integer = True

    def __init__(self, plan: RoundPlan) -> None:
        self.plan = plan
        self.properties = Properties(linear=True, min_updates=2, sensitivity=plan.l2 / plan.gamma, hides_inputs=True)

    def encode(self, updates: list[np.ndarray], weights: list[float], bound: float) -> dict[int, np.ndarray]:
        plan = self.plan
        return {i + 1: distributed_input(u, clip_norm=plan.clip_norm, gamma=plan.gamma,
                                         client_variance=plan.client_variance,
                                         rng=client_rng(plan.seed, plan.round_index, i + 1))
                for i, u in enumerate(updates)}

    def decode(self, total: np.ndarray, bound: float) -> tuple[np.ndarray, Report]:
        out = np.empty(total.size - 1, dtype=np.float32)
        np.divide(np.asarray(total[:-1], dtype=np.float64), self.plan.gamma, out=out, casting="same_kind")
        return out, {}


@dataclass
class SecureBuffer:
    """One round's updates and weights, until the protocol runs at ``finish``."""

    updates: list[np.ndarray] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


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

    def weighted_mean(self) -> SecureSum:
        """FedAvg's weighted mean through the protocol."""
        return SecureSum(self, WeightedInputs())

    def clipped_sum(self, clip_norm: float) -> SecureSum:
        """Central DP's clipped sum (clients clip before masking) and its count within the clip."""
        return SecureSum(self, ClippedInputs(clip_norm))

    def distributed_sum(self, plan: RoundPlan) -> SecureSum:
        """Distributed DP's noised sum / gamma: every client clips, rounds and noises its own input."""
        return SecureSum(self, DistributedInputs(plan))


class SecureSum:
    """A reduction computed through one SecAgg round: the server learns only the decoded sum.

    In simulation ``finish`` plays every client in-process; over the network the round loop runs the
    protocol and calls ``decode`` on the sum. Reports :data:`PROTOCOL_METRICS` and the encoding's.
    """

    def __init__(self, settings: SecureAggregation, encoding: Encoding) -> None:
        self.settings, self.encoding = settings, encoding
        inner = encoding.properties
        self.properties = Properties(linear=inner.linear, uses_weights=inner.uses_weights, min_updates=2,
                                     sensitivity=inner.sensitivity, hides_inputs=True,
                                     metrics=(*inner.metrics, *PROTOCOL_METRICS))

    def start(self, dim: int) -> SecureBuffer:
        return SecureBuffer()

    def add(self, acc: SecureBuffer, update: np.ndarray, weight: float) -> SecureBuffer:
        acc.updates.append(np.asarray(update, dtype=np.float64))
        acc.weights.append(float(weight))
        return acc

    def finish(self, acc: SecureBuffer) -> tuple[np.ndarray, Report]:
        n = len(acc.updates)
        if n == 0:
            raise EmptyAggregationError("no updates to aggregate securely")
        if n < 2:
            raise AggregationAssumptionError(f"secure aggregation needs at least 2 updates, got {n}: a sum of one "
                                             "is that client's update")
        settings = self.settings
        rng = np.random.default_rng(settings.seed)
        inputs = self.encoding.encode(acc.updates, acc.weights, settings.bound)
        acc.updates.clear()
        config = settings.protocol_config(n, len(inputs[1]), session=int(rng.integers(2**63)),
                                          integer=self.encoding.integer)
        drop = rng.choice(np.arange(1, n + 1), size=int(settings.dropout_fraction * n), replace=False)
        report = run_round(config, inputs, drop_before={"unmask": [int(c) for c in drop]})
        if report.n_clipped:
            log.warning("secure aggregation: %d values outside [-%g, %g] were clipped; raise the bound",
                        report.n_clipped, settings.bound, settings.bound)
        vector, out = self.decode(report.total, len(report.included))
        out.update(secagg_bytes_sent=sum(report.bytes_sent.values()), secagg_clipped_values=report.n_clipped)
        return vector, out

    def decode(self, total: np.ndarray, contributors: int) -> tuple[np.ndarray, Report]:
        """The reduced vector and report from the protocol's sum of ``contributors`` clients' inputs."""
        vector, report = self.encoding.decode(total, self.settings.bound)
        report["contributors"] = contributors
        return vector, report

    def __repr__(self) -> str:
        return f"secure_sum({type(self.encoding).__name__})"
