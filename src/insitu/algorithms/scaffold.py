"""SCAFFOLD (Karimireddy et al. 2020): control variates correct every local gradient for client drift.

Server half: sends its control variate c (under :data:`SCAFFOLD_C`) and folds the clients'
control-variate deltas (:data:`SCAFFOLD_DELTA_C`) into it. Client half: corrects every gradient by
c - c_i and keeps c_i in the client's state store (:data:`SCAFFOLD_STATE`) between rounds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from insitu.algorithms.base import ALGORITHM, AlgorithmState, FitContext, LocalRound, check_extras
from insitu.params import Parameters, ParamSpec

if TYPE_CHECKING:
    from insitu.client.api import Config, FitResult

log = logging.getLogger("insitu")

SCAFFOLD_C = "scaffold_c"  # config: the server control variate c (Parameters)
SCAFFOLD_DELTA_C = "scaffold_delta_c"  # result extras: c_i+ - c_i (Parameters)
SCAFFOLD_STATE = "scaffold_c_i"  # client state: this client's control variate c_i


@dataclass
class _DeltaSum:
    total: np.ndarray  # sum of w_i delta_c_i
    weight: float = 0.0  # sum of w_i
    count: int = 0


@dataclass(frozen=True)
class Scaffold:
    """SCAFFOLD with option II control variates.

    The server sends its control variate c; each client corrects every local gradient by
    (c - c_i) and returns delta_c = c_i+ - c_i, where c_i+ is its raw minibatch gradients over the K
    local steps averaged with the weight its optimizer gave each in the distance moved (under plain
    SGD the mean, exactly option II's c_i - c + (x - y) / (K lr); under momentum option II with the
    effective step count; under Adam the mean bias-corrected first moment). See ``_ScaffoldStep``.

    c must be the gradient of the objective the server descends, or the corrected local objectives
    f_i(y) + <c - c_i, y> do not add up to it and the correction biases every step. With
    ``weighted`` (the default, matching FedAvg's example-weighted mean) c is the example-weighted
    mean of the c_i: c <- c + (|S| / N) sum_S n_i delta_c_i / sum_S n_i, N being the number of
    clients in the federation (exact when every client takes part; with sampling the total example
    count is estimated from the sample's). With ``weighted=False`` (for a reducer that ignores
    example counts, such as the median) c is the plain mean: c <- c + sum_S delta_c_i / N, as in the
    paper.
    """

    weighted: bool = True
    name: ClassVar[str] = "scaffold"
    secure_compatible: ClassVar[bool] = False  # delta_c travels per client, in the clear
    result_extras: ClassVar[tuple[str, ...]] = (SCAFFOLD_DELTA_C,)

    def init_state(self, parameters: Parameters) -> AlgorithmState:
        return {"c": np.zeros(parameters.num_values, dtype=np.float32)}

    def fit_config(self, state: AlgorithmState, specs: tuple[ParamSpec, ...]) -> Config:
        return {ALGORITHM: self.name, SCAFFOLD_C: Parameters.from_flat(state["c"], specs)}

    def check_result(self, result: FitResult, specs: tuple[ParamSpec, ...]) -> str | None:
        return check_extras(result, specs, self.result_extras, self.name)

    def start(self, dim: int) -> _DeltaSum:
        return _DeltaSum(np.zeros(dim, dtype=np.float32))

    def add(self, acc: _DeltaSum, result: FitResult) -> _DeltaSum:
        weight = float(result.num_examples) if self.weighted else 1.0
        if weight > 0:
            acc.total += np.float32(weight) * result.extras[SCAFFOLD_DELTA_C].flat()
            acc.weight += weight
        acc.count += 1
        return acc

    def finish(self, acc: _DeltaSum, state: AlgorithmState, num_clients: int) -> AlgorithmState:
        if acc.count == 0 or acc.weight == 0:
            return state
        share = acc.count / max(num_clients, acc.count)  # the sampled share of the federation
        c = state["c"] + acc.total * np.float32(share / acc.weight)
        return {"c": c.astype(np.float32, copy=False)}

    @staticmethod
    def client_half(fit: FitContext) -> LocalRound:
        step = _ScaffoldStep(fit)
        return LocalRound(step.after_backward, step.after_training)


class _ScaffoldStep:
    """One client's SCAFFOLD round: corrected gradients, then the control-variate update.

    Every local gradient g (after backward, before the optimizer step) is corrected to g - c_i + c,
    and the corrected gradient goes to whatever optimizer the client runs: with momentum, Adam or
    weight decay that optimizer minimises the corrected local objective f_i(y) + <c - c_i, y>.

    The new control variate c_i+ is this round's raw (uncorrected) gradients averaged with the
    weight the optimizer gave each of them in the distance the model moved, so that c_i+ and the
    correction c - c_i (which goes through the same optimizer) are measured in the same units. The
    optimizer's first moment is replayed on the raw gradients: m_j = beta m_{j-1} + tau g_j, and,
    fed a constant 1, s_j = beta s_{j-1} + tau.

    * SGD with momentum beta (tau = 1; beta = 0 is plain SGD): step j moves the model by lr m_j, so
      x - y = lr sum_j m_j and c_i+ = sum_j m_j / sum_j s_j. A gradient early in the round moves the
      model on every later step (weight (1 - beta^(K-k+1)) / (1 - beta)), the last one only once.
      Without weight decay this is option II with the effective step count S = sum_j s_j in place of
      K: c_i+ = c_i - c + (x - y) / (S lr). With beta = 0 it is the plain mean (1/K) sum_k g_k, which
      is exactly option II's c_i - c + (x - y) / (K lr). Option II's formula itself reads the
      gradients back from the distance travelled with K, not S: with momentum 0.9 it makes c_i about
      ten times too large and SCAFFOLD diverges; the unweighted mean is stable but credits late
      gradients (which barely moved the model, and whose momentum is dropped at the round's end) as
      much as early ones.
    * Adam (tau = 1 - beta1): every step has about the same size, lr m_j / s_j / sqrt(v_j), so
      c_i+ is the mean over the steps of the bias-corrected first moment, (1/K) sum_j m_j / s_j (the
      per-coordinate 1/sqrt(v_j) scales g and the correction alike and is left out).

    Weight decay is added by the optimizer, so it is not part of g (it is the same for every
    client and would cancel in c - c_i anyway).
    """

    def __init__(self, fit: FitContext) -> None:
        server_c = fit.config.get(SCAFFOLD_C)
        if not isinstance(server_c, Parameters) or server_c.specs != fit.sent.specs:
            raise ValueError(f"the server's SCAFFOLD control variate ({SCAFFOLD_C!r}) is missing or does not match "
                             "the model it sent")
        self.state = fit.require_state("SCAFFOLD")
        self.specs = fit.sent.specs
        self.size = fit.sent.num_values
        self.c = server_c.flat()
        c_i = self.state.load(SCAFFOLD_STATE)
        if c_i is not None and c_i.size != self.size:
            log.warning("stored SCAFFOLD control variate has %d values, the model %d: starting it afresh",
                        c_i.size, self.size)
            c_i = None
        self.c_i = np.zeros(self.size, dtype=np.float32) if c_i is None else np.asarray(c_i, dtype=np.float32)
        # The optimizer's first moment: m <- beta m + tau g.
        group = fit.optimizer.param_groups[0]
        if isinstance(fit.optimizer, torch.optim.Adam):
            beta1 = float(group["betas"][0])
            self.beta, self.tau, self.normalized = beta1, 1.0 - beta1, True
        elif isinstance(fit.optimizer, torch.optim.SGD):
            self.beta, self.tau, self.normalized = float(group["momentum"]), 1.0, False
        else:
            raise TypeError(f"SCAFFOLD replays the first moment of SGD or Adam; this client trains with "
                             f"{type(fit.optimizer).__name__}: choose optimizer 'sgd' or 'adam'")
        # Control variates cover trainable parameters only; buffers (BatchNorm statistics) stay 0.
        trainable = dict(fit.trainable())
        correction = torch.from_numpy(self.c - self.c_i)
        self.params: list[nn.Parameter] = []
        self.offsets: list[int] = []
        self.corrections: list[torch.Tensor] = []
        self.moments: list[torch.Tensor] = []  # m_j: the first moment of the raw gradients
        self.totals: list[torch.Tensor] = []  # sum_j of m_j (SGD) or m_j / s_j (Adam)
        offset = 0
        for spec in self.specs:
            param = trainable.get(spec.name)
            if param is not None:
                self.params.append(param)
                self.offsets.append(offset)
                self.corrections.append(correction[offset : offset + spec.size].view_as(param).to(param.device))
                self.moments.append(torch.zeros_like(param, dtype=torch.float32))
                self.totals.append(torch.zeros_like(param, dtype=torch.float32))
            offset += spec.size
        self.unit = 0.0  # s_j: the first moment of a constant 1
        self.weight = 0.0  # sum_j s_j (SGD) or the step count (Adam)

    def after_backward(self) -> None:
        """Fold the raw gradient g into m and its running total, then g <- g - c_i + c.

        A parameter without a gradient in a step (unused by that batch) counts as g = 0 there, as
        option II would see it (plain SGD does not move it)."""
        self.unit = self.beta * self.unit + self.tau
        scale = 1.0 / self.unit if self.normalized else 1.0
        self.weight += 1.0 if self.normalized else self.unit
        with torch.no_grad():
            for param, correction, moment, total in zip(self.params, self.corrections, self.moments, self.totals):
                moment.mul_(self.beta)
                if param.grad is not None:
                    moment.add_(param.grad, alpha=self.tau)
                    param.grad.add_(correction)
                total.add_(moment, alpha=scale)

    def after_training(self) -> dict[str, Parameters]:
        """Stores c_i+ (see the class) and returns delta_c = c_i+ - c_i (zeros if nothing trained)."""
        if self.weight == 0:
            return {SCAFFOLD_DELTA_C: Parameters.from_flat(np.zeros(self.size, dtype=np.float32), self.specs)}
        new_c_i = np.zeros(self.size, dtype=np.float32)
        for offset, total in zip(self.offsets, self.totals):
            mean = (total / self.weight).reshape(-1).cpu().numpy()
            new_c_i[offset : offset + mean.size] = mean
        self.state.save(SCAFFOLD_STATE, new_c_i)
        return {SCAFFOLD_DELTA_C: Parameters.from_flat(new_c_i - self.c_i, self.specs)}
