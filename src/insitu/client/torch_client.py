"""TorchClient: a ready client that trains any ``nn.Module`` on its (indexed) dataset.

The training loop is deliberately the loop one would write by hand: batches are gathered by index
from tensors already in memory, and nothing runs per sample in Python. Several virtual clients may
share one model object; each call loads the global parameters into it first.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from insitu.client.api import Config, EvalResult, FitResult
from insitu.client.state import ClientState
from insitu.params import Parameters

if TYPE_CHECKING:
    from insitu.data.datasets import TensorDataset

log = logging.getLogger("insitu")

OPTIMIZERS = ("sgd", "adam")
ADAM_BETAS = (0.9, 0.999)  # torch's defaults, named because SCAFFOLD's control variate replays beta1
SCAFFOLD_C = "scaffold_c"  # config: the server control variate c (Parameters)
SCAFFOLD_DELTA_C = "scaffold_delta_c"  # result extras: c_i+ - c_i (Parameters)
SCAFFOLD_STATE = "scaffold_c_i"  # client state: this client's control variate c_i
GradHook = Callable[[], None]
LOSSES: dict[str, Callable[[], nn.Module]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "nll": nn.NLLLoss,
    "mse": nn.MSELoss,
}


@dataclass(frozen=True)
class TrainSettings:
    """Local training hyper-parameters; any field may be overridden per round by the server config."""

    local_epochs: int = 1
    batch_size: int = 32  # 0 means the whole local dataset in one batch (FedSGD)
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: str = "cross_entropy"
    eval_batch_size: int = 1024
    proximal_mu: float = 0.0  # FedProx: adds mu/2 ||w - w_global||^2 to the local objective

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.local_epochs < 0 or self.batch_size < 0 or self.eval_batch_size < 1:
            raise ValueError("local_epochs and batch_size must be >= 0 and eval_batch_size >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.proximal_mu >= 0:
            raise ValueError(f"proximal_mu (FedProx's mu) must be >= 0, got {self.proximal_mu}")

    def updated(self, config: Config) -> TrainSettings:
        """A copy with every config key that names a field applied (cast to the field's type)."""
        changes: dict[str, Any] = {}
        for f in fields(self):
            if f.name in config:
                kind = type(getattr(self, f.name))
                changes[f.name] = kind(config[f.name])
        return replace(self, **changes) if changes else self


class TorchClient:
    """Train/evaluate ``model`` on ``train``/``test`` (optionally restricted to index lists).

    ``config`` from the server may override :class:`TrainSettings` fields (``lr``, ``local_epochs``,
    ``batch_size``, ...) and carries a ``seed`` that makes local shuffling reproducible.
    """

    def __init__(
        self,
        model: nn.Module,
        train: TensorDataset | None,
        test: TensorDataset | None = None,
        *,
        train_indices: np.ndarray | torch.Tensor | None = None,
        test_indices: np.ndarray | torch.Tensor | None = None,
        settings: TrainSettings | None = None,
        loss_fn: nn.Module | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        share_result: bool = False,
        state: ClientState | None = None,
    ) -> None:
        self.model = model
        self.train = train
        self.test = test
        self.train_indices = _as_index(train_indices)
        self.test_indices = _as_index(test_indices)
        self.settings = settings or TrainSettings()
        self.loss_fn = loss_fn
        self.device = torch.device(device)
        self.seed = seed
        # Results view the (flattened, shared) model instead of copying it; see
        # Parameters.from_module(share=True). The simulation engine turns this on.
        self.share_result = share_result
        # State kept between rounds (SCAFFOLD's c_i): MemoryStates().for_client(cid) in
        # simulation, DiskState(folder) in a deployed client.
        self.state = state

    # -- Client protocol ---------------------------------------------------------------------
    def fit(self, parameters: Parameters, config: Config) -> FitResult:
        settings = self.settings.updated(config)
        parameters.to_module(self.model)
        hooks: list[GradHook] = []
        if settings.proximal_mu > 0:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            hooks.append(_proximal_hook(trainable, settings.proximal_mu))
        scaffold = None
        server_c = config.get(SCAFFOLD_C)
        if server_c is not None:
            scaffold = _ScaffoldStep(self.model, parameters, server_c, self._require_state(), settings)
            hooks.append(scaffold.hook)
        hook = _chain(hooks)
        num_examples, mean_loss = self._train(settings, _as_int(config.get("seed", self.seed)), hook)
        metrics = {"train_loss": mean_loss} if num_examples else {}
        result = FitResult(Parameters.from_module(self.model, share=self.share_result), num_examples, metrics)
        if scaffold is not None:
            result.extras[SCAFFOLD_DELTA_C] = scaffold.finish()
        return result

    def evaluate(self, parameters: Parameters, config: Config) -> EvalResult:
        settings = self.settings.updated(config)
        parameters.to_module(self.model)
        if self.test is None:
            return EvalResult(0.0, 0, {})
        loss, accuracy, n = evaluate_model(
            self.model, self.test, self.test_indices, settings.eval_batch_size, self._loss(settings), self.device
        )
        return EvalResult(loss, n, {"accuracy": accuracy})

    # -- internals ---------------------------------------------------------------------------
    def _require_state(self) -> ClientState:
        if self.state is None:
            raise ValueError("SCAFFOLD keeps a control variate per client between rounds: give this TorchClient a "
                             "state store (state=MemoryStates().for_client(cid) in simulation, DiskState(folder) "
                             "in a deployed client)")
        return self.state

    def _loss(self, settings: TrainSettings) -> nn.Module:
        return self.loss_fn if self.loss_fn is not None else LOSSES[settings.loss]()

    def _train(self, settings: TrainSettings, seed: int, grad_hook: GradHook | None = None) -> tuple[int, float]:
        """Run the local epochs; returns (examples in the local dataset, mean training loss).

        ``grad_hook`` runs after each backward pass, before the optimizer step (FedProx's proximal
        gradient, SCAFFOLD's correction)."""
        if self.train is None:
            return 0, 0.0
        x, y = self.train.x, self.train.y
        index = self.train_indices
        n = len(index) if index is not None else len(y)
        if n == 0 or settings.local_epochs == 0:
            return n, 0.0
        batch = settings.batch_size or n
        model, loss_fn, device = self.model, self._loss(settings), self.device
        optimizer = fresh_optimizer(model, settings)
        generator = torch.Generator().manual_seed(seed)
        loss_sum, steps = torch.zeros((), device=device), 0  # summed in place: no per-step objects kept
        model.train()
        for _ in range(settings.local_epochs):
            order = torch.randperm(n, generator=generator)
            if index is not None:
                order = index[order]
            for start in range(0, n, batch):
                rows = order[start : start + batch]
                xb, yb = x.index_select(0, rows), y.index_select(0, rows)
                if xb.device != device:
                    xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                if grad_hook is not None:
                    grad_hook()
                optimizer.step()
                loss_sum += loss.detach()
                steps += 1
        optimizer.zero_grad(set_to_none=True)  # the model may be shared: leave no gradients behind
        return n, float(loss_sum) / steps


_OPTIMIZERS: weakref.WeakKeyDictionary[nn.Module, torch.optim.Optimizer] = weakref.WeakKeyDictionary()


def fresh_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """An optimizer for ``model`` with no state (as if new), reused across calls on the same model.

    Building a torch optimizer costs far more than a small client's training step, and virtual
    clients share one model, so the engine keeps one optimizer per model and resets it per fit.
    """
    kind = torch.optim.Adam if settings.optimizer == "adam" else torch.optim.SGD
    hyper: dict[str, Any] = {"lr": settings.lr, "weight_decay": settings.weight_decay}
    if kind is torch.optim.SGD:
        hyper["momentum"] = settings.momentum
    else:
        hyper["betas"] = ADAM_BETAS
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _OPTIMIZERS.get(model)
    if (
        optimizer is None
        or type(optimizer) is not kind
        or len(optimizer.param_groups) != 1
        or len(optimizer.param_groups[0]["params"]) != len(params)
        or any(a is not b for a, b in zip(optimizer.param_groups[0]["params"], params))
    ):
        optimizer = kind(params, **hyper)
        _OPTIMIZERS[model] = optimizer
        return optimizer
    optimizer.state.clear()
    optimizer.param_groups[0].update(hyper)
    return optimizer


def _chain(hooks: list[GradHook]) -> GradHook | None:
    """One hook running ``hooks`` in order; None when there are none (the plain loop stays plain)."""
    if len(hooks) <= 1:
        return hooks[0] if hooks else None

    def run_all() -> None:
        for hook in hooks:
            hook()

    return run_all


def _proximal_hook(params: list[nn.Parameter], mu: float) -> GradHook:
    """Adds mu (w - w_global) to each gradient: the gradient of FedProx's mu/2 ||w - w_global||^2."""
    anchors = [p.detach().clone() for p in params]

    def hook() -> None:
        with torch.no_grad():
            for p, anchor in zip(params, anchors):
                if p.grad is not None:
                    p.grad.add_(p - anchor, alpha=mu)

    return hook


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

    def __init__(self, model: nn.Module, global_params: Parameters, server_c: object, state: ClientState,
                 settings: TrainSettings) -> None:
        if not isinstance(server_c, Parameters) or server_c.specs != global_params.specs:
            raise ValueError("the server's SCAFFOLD control variate does not match the model it sent")
        specs = global_params.specs
        self.specs, self.state = specs, state
        self.size = global_params.num_values
        self.c = server_c.flat()
        c_i = state.load(SCAFFOLD_STATE)
        if c_i is not None and c_i.size != self.size:
            log.warning("stored SCAFFOLD control variate has %d values, the model %d: starting it afresh",
                        c_i.size, self.size)
            c_i = None
        self.c_i = np.zeros(self.size, dtype=np.float32) if c_i is None else np.asarray(c_i, dtype=np.float32)
        # The optimizer's first moment (see fresh_optimizer): m <- beta m + tau g.
        if settings.optimizer == "adam":
            self.beta, self.tau, self.normalized = ADAM_BETAS[0], 1.0 - ADAM_BETAS[0], True
        else:
            self.beta, self.tau, self.normalized = settings.momentum, 1.0, False
        # Control variates cover trainable parameters only; buffers (BatchNorm statistics) stay 0.
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        correction = torch.from_numpy(self.c - self.c_i)
        self.params: list[nn.Parameter] = []
        self.offsets: list[int] = []
        self.corrections: list[torch.Tensor] = []
        self.moments: list[torch.Tensor] = []  # m_j: the first moment of the raw gradients
        self.totals: list[torch.Tensor] = []  # sum_j of m_j (SGD) or m_j / s_j (Adam)
        offset = 0
        for spec in specs:
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

    def hook(self) -> None:
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

    def finish(self) -> Parameters:
        """Stores c_i+ (see the class) and returns delta_c = c_i+ - c_i (zeros if nothing trained)."""
        if self.weight == 0:
            return Parameters.from_flat(np.zeros(self.size, dtype=np.float32), self.specs)
        new_c_i = np.zeros(self.size, dtype=np.float32)
        for offset, total in zip(self.offsets, self.totals):
            mean = (total / self.weight).reshape(-1).cpu().numpy()
            new_c_i[offset : offset + mean.size] = mean
        self.state.save(SCAFFOLD_STATE, new_c_i)
        return Parameters.from_flat(new_c_i - self.c_i, self.specs)


def _as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"config 'seed' must be an integer, got {value!r}")
    return int(value)


def _as_index(indices: np.ndarray | torch.Tensor | None) -> torch.Tensor | None:
    if indices is None:
        return None
    return torch.as_tensor(np.asarray(indices, dtype=np.int64))


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    data: TensorDataset,
    indices: torch.Tensor | None = None,
    batch_size: int = 1024,
    loss_fn: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> tuple[float, float, int]:
    """Mean loss, accuracy in [0, 1] and example count of ``model`` on ``data`` (or its rows)."""
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    x, y = data.x, data.y
    if indices is not None:
        x, y = x.index_select(0, indices), y.index_select(0, indices)
    n = len(y)
    if n == 0:
        return 0.0, 0.0, 0
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        out = model(xb)
        total_loss += float(loss_fn(out, yb)) * len(yb)
        correct += int((out.argmax(1) == yb).sum())
    return total_loss / n, correct / n, n
