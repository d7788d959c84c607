"""TorchClient: a ready client that trains any ``nn.Module`` on its (indexed) dataset.

The training loop is deliberately the loop one would write by hand: batches are gathered by index
from tensors already in memory, and nothing runs per sample in Python. Several virtual clients may
share one model object; each call loads the global parameters into it first.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from insitu.client.api import Config, EvalResult, FitResult
from insitu.params import Parameters

if TYPE_CHECKING:
    from insitu.data.datasets import TensorDataset

OPTIMIZERS = ("sgd", "adam")
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

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.local_epochs < 0 or self.batch_size < 0 or self.eval_batch_size < 1:
            raise ValueError("local_epochs and batch_size must be >= 0 and eval_batch_size >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

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

    # -- Client protocol ---------------------------------------------------------------------
    def fit(self, parameters: Parameters, config: Config) -> FitResult:
        settings = self.settings.updated(config)
        parameters.to_module(self.model)
        num_examples, mean_loss = self._train(settings, int(config.get("seed", self.seed)))
        metrics = {"train_loss": mean_loss} if num_examples else {}
        return FitResult(Parameters.from_module(self.model, share=self.share_result), num_examples, metrics)

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
    def _loss(self, settings: TrainSettings) -> nn.Module:
        return self.loss_fn if self.loss_fn is not None else LOSSES[settings.loss]()

    def _train(self, settings: TrainSettings, seed: int) -> tuple[int, float]:
        """Run the local epochs; returns (examples in the local dataset, mean training loss)."""
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
