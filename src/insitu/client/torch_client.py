"""TorchClient: a ready client that trains any ``nn.Module`` on its (indexed) dataset.

The training loop is deliberately the loop one would write by hand: batches are gathered by index
from tensors already in memory, and nothing runs per sample in Python. Several virtual clients may
share one model object; each call loads the global parameters into it first. It is the one loop
every client algorithm runs in: the algorithm the task names (``config["algorithm"]``, see
:mod:`insitu.algorithms`) hooks in after each backward pass and adds extras to the result, and a
loop plug-in (:class:`LoopPlugin`; DP-SGD's in :mod:`insitu.privacy.local`) may draw the batches and
take the optimizer steps its own way.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn

from insitu.algorithms import FitContext, GradHook, algorithm_for
from insitu.client.api import Config, EvalResult, FitResult
from insitu.client.state import ClientState
from insitu.params import Parameters

if TYPE_CHECKING:
    from insitu.data.datasets import TensorDataset

OPTIMIZERS = ("sgd", "adam")
ADAM_BETAS = (0.9, 0.999)  # torch's defaults
LOSSES: dict[str, Callable[[], nn.Module]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "nll": nn.NLLLoss,
    "mse": nn.MSELoss,
}


@dataclass(frozen=True)
class TrainSettings:
    """Local training hyper-parameters; any field may be overridden per task by the server config."""

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
                kind, value = type(getattr(self, f.name)), config[f.name]
                if kind is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError(f"config {f.name!r} must be a whole number, got {value}")
                changes[f.name] = kind(value)
        return replace(self, **changes) if changes else self


class Steps(NamedTuple):
    """How one fit's batches are drawn and stepped, as a :class:`LoopPlugin` opens them.

    ``batches`` yields the rows of each optimizer step (indices into the training tensors; a step
    may draw none); ``forward`` is what the loop calls on a batch; ``optimizer`` is zeroed before
    each step; ``step(after_backward, empty)`` turns the gradient into a model update, running the
    client algorithm's ``after_backward`` (if any) on the gradient the update will use."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    batches: Iterable[torch.Tensor]
    step: Callable[[GradHook | None, bool], None]


class LoopPlugin(Protocol):
    """Changes how the one training loop samples batches and steps (DP-SGD: Poisson sampling,
    per-example clipping, noise), without a second loop."""

    def open(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
             index: torch.Tensor | None, num_examples: int, settings: TrainSettings,
             seed: int) -> AbstractContextManager[Steps]:
        """The steps of one fit over ``num_examples`` rows (``index``, or all rows when None); whatever
        it attaches to ``model`` or ``optimizer`` it removes on exit."""
        ...


class ShuffledSGD:
    """The plain loop: each epoch reshuffles the rows (by the task's seed) and cuts them into batches;
    each step is one optimizer step."""

    def open(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
             index: torch.Tensor | None, num_examples: int, settings: TrainSettings,
             seed: int) -> AbstractContextManager[Steps]:
        return nullcontext(Steps(model, optimizer, _shuffled_batches(index, num_examples, settings, seed),
                                 partial(_optimizer_step, optimizer)))


def _shuffled_batches(index: torch.Tensor | None, n: int, settings: TrainSettings, seed: int) -> Iterator[torch.Tensor]:
    batch = settings.batch_size or n
    generator = torch.Generator().manual_seed(seed)
    for _ in range(settings.local_epochs):
        order = torch.randperm(n, generator=generator)
        if index is not None:
            order = index[order]
        yield from order.split(batch)  # the epoch's batches as views, cut in one call


def _optimizer_step(optimizer: torch.optim.Optimizer, after_backward: GradHook | None, empty: bool) -> None:
    if after_backward is not None:
        after_backward()
    optimizer.step()


class TorchClient:
    """Train/evaluate ``model`` on ``train``/``test`` (optionally restricted to index lists).

    ``config`` from the server may override :class:`TrainSettings` fields (``lr``, ``local_epochs``,
    ``batch_size``, ...), names the client algorithm to run and carries a ``seed`` that makes local
    shuffling reproducible. ``loop_plugin`` changes how batches are drawn and stepped (DP-SGD).
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
        loop_plugin: LoopPlugin | None = None,
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
        self.loop_plugin: LoopPlugin = loop_plugin if loop_plugin is not None else ShuffledSGD()

    # -- Client protocol ---------------------------------------------------------------------
    def fit(self, parameters: Parameters, config: Config) -> FitResult:
        algorithm = algorithm_for(config)  # before touching the model: an unknown one fails the task
        settings = self.settings.updated(config)
        seed = _as_int(config.get("seed", self.seed))
        parameters.to_module(self.model)
        optimizer = fresh_optimizer(self.model, settings)
        local = algorithm.client_half(FitContext(self.model, parameters, config, optimizer, self.state))
        num_examples, mean_loss = self._train(settings, seed, optimizer, local.after_backward)
        metrics = {"train_loss": mean_loss} if num_examples else {}
        return FitResult(Parameters.from_module(self.model, share=self.share_result), num_examples, metrics,
                         local.after_training())

    def evaluate(self, parameters: Parameters, config: Config) -> EvalResult:
        settings = self.settings.updated(config)
        parameters.to_module(self.model)
        if self.test is None:
            return EvalResult(0.0, 0, {})
        loss, accuracy, n = evaluate_model(
            self.model, self.test, self.test_indices, settings.eval_batch_size, self._loss(settings), self.device
        )
        return EvalResult(loss, n, {"accuracy": accuracy})

    def num_train_examples(self) -> int:
        """How many examples this client trains on."""
        if self.train is None:
            return 0
        return len(self.train_indices) if self.train_indices is not None else len(self.train.y)

    # -- internals ---------------------------------------------------------------------------
    def _loss(self, settings: TrainSettings) -> nn.Module:
        if self.loss_fn is not None:
            return self.loss_fn
        loss = _DEFAULT_LOSSES.get(settings.loss)
        if loss is None:  # built once per name: a Module costs more to build than a small client's step
            loss = _DEFAULT_LOSSES[settings.loss] = LOSSES[settings.loss]()
        return loss

    def _train(self, settings: TrainSettings, seed: int, optimizer: torch.optim.Optimizer,
               after_backward: GradHook | None) -> tuple[int, float]:
        """Run the local epochs, the one training loop; returns (examples in the local dataset, mean
        training loss per example). ``after_backward`` (the algorithm's gradient correction) runs on
        the gradient each step uses."""
        n, train = self.num_train_examples(), self.train
        if train is None or n == 0 or settings.local_epochs == 0:
            return n, 0.0
        x, y, model, device = train.x, train.y, self.model, self.device
        # data moved to an accelerator is indexed there (index_select wants the rows on the data's device)
        data_device = None if x.device.type == "cpu" else x.device
        loss_fn = self._loss(settings)
        summed = getattr(loss_fn, "reduction", "mean") == "sum"
        # On CPU a Python float is the cheapest running sum (.item() does not wait on a device);
        # elsewhere the sum stays on the device so no step waits for the accelerator.
        on_cpu = device.type == "cpu"
        loss_sum: float | torch.Tensor = 0.0 if on_cpu else torch.zeros((), device=device)
        steps = 0
        model.train()
        with self.loop_plugin.open(model, optimizer, loss_fn, self.train_indices, n, settings, seed) as loop:
            forward, zero_grad, step = loop.forward, loop.optimizer.zero_grad, loop.step
            for rows in loop.batches:
                zero_grad(set_to_none=True)
                count = rows.shape[0]  # not len(rows): Tensor.__len__ is a slow Python method
                if count:
                    if data_device is not None:
                        rows = rows.to(data_device, non_blocking=True)
                    xb, yb = x.index_select(0, rows), y.index_select(0, rows)
                    if xb.device != device:
                        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                    loss = loss_fn(forward(xb), yb)
                    loss.backward()
                    step_loss = loss.item() if on_cpu else loss.detach()
                    loss_sum += step_loss / count if summed else step_loss
                    steps += 1
                step(after_backward, not count)
            zero_grad(set_to_none=True)  # the model may be shared: leave no gradients behind
        return n, float(loss_sum) / max(steps, 1)


_DEFAULT_LOSSES: dict[str, nn.Module] = {}  # stateless modules, shared by every client
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


def _as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"config 'seed' must be an integer, got {value!r}")
    return int(value)


def _as_index(indices: np.ndarray | torch.Tensor | None) -> torch.Tensor | None:
    if indices is None:
        return None
    if isinstance(indices, torch.Tensor) and indices.dtype == torch.int64 and indices.device.type == "cpu":
        return indices  # already an index (simulation converts each partition once, not per fit)
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
        indices = indices.to(x.device)
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
