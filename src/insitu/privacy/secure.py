"""Secure aggregation as a reducer, for simulation: every round runs the real SecAgg protocol.

Each client's update (weighted for FedAvg, or clipped for DP) is fixed-point encoded, masked and
summed by :mod:`insitu.privacy.secagg`, with optional dropouts after the masked input was sent; the
server side only ever decodes the sum. In simulation all parties live in one process, so this
measures correctness, dropout tolerance and cost, not secrecy; the deployment needs the protocol's
four message rounds over the network (not wired into the gRPC engine yet).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from insitu.aggregation.base import AggregationAssumptionError, EmptyAggregationError
from insitu.aggregation.transforms import l2_norm
from insitu.privacy.secagg.encoding import split_weighted, with_weight
from insitu.privacy.secagg.protocol import SecAggConfig
from insitu.privacy.secagg.simulate import RoundReport, run_round

log = logging.getLogger("insitu")


@dataclass
class SecureBuffer:
    updates: list[np.ndarray] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    unclipped: int = 0


@dataclass
class SecureAggregation:
    """Settings: element bound B of the fixed-point encoding, dropouts to simulate, the threshold.

    ``threshold_fraction`` sets t = max(floor(n x fraction) + 1, floor(n / 2) + 1) of the round's n
    clients; ``dropout_fraction`` of them go silent after sending their masked input (their input
    still counts: the server reconstructs their self-masks from the others' shares).
    """

    bound: float = 10.0
    threshold_fraction: float = 0.5
    dropout_fraction: float = 0.0
    seed: int | None = None
    last_report: RoundReport | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.bound > 0:
            raise ValueError(f"secure aggregation bound must be > 0, got {self.bound}")
        if not 0.5 <= self.threshold_fraction < 1:
            raise ValueError(f"threshold_fraction must be in [0.5, 1): below half the clients the server could "
                             f"unmask individual updates; got {self.threshold_fraction}")
        if not 0 <= self.dropout_fraction < 1:
            raise ValueError(f"dropout_fraction must be in [0, 1), got {self.dropout_fraction}")

    def reducer(self, *, clip_norm: float | None = None, noise_std: float = 0.0,
                denominator: float | None = None) -> SecureMean:
        """A fresh reducer: weighted mean, or (with ``clip_norm``) DP-FedAvg's clipped noisy mean."""
        return SecureMean(self, clip_norm, noise_std, denominator)


class SecureMean:
    """Weighted mean (or clipped sum + noise / denominator) computed through one SecAgg round."""

    streaming = False
    shift_equivariant = False
    min_updates = 2

    def __init__(self, settings: SecureAggregation, clip_norm: float | None, noise_std: float,
                 denominator: float | None) -> None:
        self.settings, self.clip_norm, self.noise_std, self.denominator = settings, clip_norm, noise_std, denominator

    def start(self, dim: int) -> SecureBuffer:
        return SecureBuffer()

    def add(self, acc: SecureBuffer, update: np.ndarray, weight: float) -> SecureBuffer:
        vector = np.asarray(update, dtype=np.float64)
        if self.clip_norm is not None:  # the client clips before masking: the server cannot
            norm = l2_norm(vector)
            acc.unclipped += int(norm <= self.clip_norm)
            if norm > self.clip_norm:
                vector = vector * (self.clip_norm / norm)
        acc.updates.append(vector)
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
        dp = self.clip_norm is not None
        top = max(acc.weights)
        inputs = {i + 1: (u if dp else with_weight(u, w / top)) for i, (u, w) in enumerate(zip(acc.updates, acc.weights))}
        acc.updates.clear()
        t = max(int(n * settings.threshold_fraction) + 1, n // 2 + 1)
        config = SecAggConfig(n, t, len(inputs[1]), settings.bound, session=int(rng.integers(2**63)))
        drop = rng.choice(np.arange(1, n + 1), size=int(settings.dropout_fraction * n), replace=False)
        report = run_round(config, inputs, drop_before={"unmask": [int(c) for c in drop]})
        settings.last_report = report
        if report.n_clipped:
            log.warning("secure aggregation: %d values outside [-%g, %g] were clipped; raise the bound",
                        report.n_clipped, settings.bound, settings.bound)
        if not dp:
            return split_weighted(report.total).astype(np.float32)
        noisy = report.total + np.random.default_rng().normal(0.0, self.noise_std, size=report.total.shape)
        return (noisy / (self.denominator or n)).astype(np.float32)
