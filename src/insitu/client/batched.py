"""Batched cohorts: K clients' plain local SGD trained at once, as one vectorized computation.

Small clients spend most of their time in per-step overhead (Python, autograd, optimizer), not in
arithmetic. :func:`train_cohort` stacks K copies of the global model and runs every client's steps
together with ``torch.func.vmap(grad(functional_call))``: step t of every client is one batched
forward/backward pass. Each client draws exactly the batches :class:`~insitu.client.torch_client.TorchClient`
draws (the task's seed, a ``randperm`` per epoch, cut into batches), takes the mean loss over its own
rows (a short last batch included), and stops when its own batches run out (later steps are masked:
no update), so the result is the math of K separate loops. It is not bit-identical: the batched
matrix products reduce in another order, and a batch's mean is taken as a weighted sum; the
difference is float32 rounding (~1e-6 after an epoch).

Only plain local SGD (FedAvg/FedSGD clients: SGD with optional momentum and weight decay) on
stateless, deterministic models is batched; :func:`cohort_obstacle` says why any other client
must run on its own (the engine then runs it through its ordinary loop).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from insitu.algorithms import ALGORITHM, LocalSGD
from insitu.client.api import Client, Config, FitResult
from insitu.client.torch_client import ShuffledSGD, TorchClient, TrainSettings, _as_int, _shuffled_batches
from insitu.params import Parameters

_PER_ROW_LOSSES = ("cross_entropy", "nll", "mse")
_MODEL_OBSTACLES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


class Member(NamedTuple):
    """One client of a cohort and its fit task's config."""

    client: TorchClient
    config: Config


def cohort_obstacle(client: Client, config: Config) -> str | None:
    """Why ``client``'s fit task with ``config`` cannot be trained in a batched cohort, or None if it can."""
    if type(client) is not TorchClient:
        return f"the client is a {type(client).__name__}, not a plain TorchClient"
    if type(client.loop_plugin) is not ShuffledSGD:
        return f"the client has a custom loop plug-in ({type(client.loop_plugin).__name__})"
    algorithm = config.get(ALGORITHM, LocalSGD.name)
    if algorithm != LocalSGD.name:
        return f"client algorithm {algorithm!r} is not plain local SGD"
    if client.loss_fn is not None:
        return "the client has its own loss_fn (only the named losses have a known per-row form)"
    settings = client.settings.updated(config)
    if settings.optimizer != "sgd":
        return f"optimizer {settings.optimizer!r} (only SGD, with or without momentum, is batched)"
    if settings.loss not in _PER_ROW_LOSSES:
        return f"loss {settings.loss!r} has no per-row form here"
    if client.train is None or client.num_train_examples() == 0 or settings.local_epochs == 0:
        return "the client takes no local step"
    return model_obstacle(client.model)


def model_obstacle(model: nn.Module) -> str | None:
    """Why ``model`` cannot be trained as K stacked copies (cached per model), or None if it can."""
    known = _MODEL_OBSTACLES.get(model)
    if known is not None:
        return known or None
    reason = _model_obstacle(model)
    _MODEL_OBSTACLES[model] = reason or ""
    return reason


def forbid_batching(model: nn.Module, reason: str) -> None:
    """Remember that ``model`` cannot be batched (found out at run time, e.g. randomness in forward)."""
    _MODEL_OBSTACLES[model] = reason


def _model_obstacle(model: nn.Module) -> str | None:
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        return (f"the model has buffers ({', '.join(buffers[:3])}{', ...' if len(buffers) > 3 else ''}), such as "
                "BatchNorm running statistics, which training changes in place")
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"the model draws randomness in forward (dropout {name!r})"
    params = list(model.named_parameters())
    if not params:
        return "the model has no parameters"
    for name, p in params:
        if p.dtype != torch.float32:
            return f"parameter {name!r} is {p.dtype}, not float32"
        if not p.requires_grad:
            return f"parameter {name!r} is frozen (requires_grad=False)"
    if [name for name, _ in params] != list(model.state_dict().keys()):
        return "the model's state_dict is not exactly its parameters"
    return None


def cohort_key(member: Member) -> tuple[int, int, int, str, str]:
    """Members with equal keys can share one batched computation: same model object, same training
    tensors, same device and loss (batch size, epochs, lr, momentum and weight decay may differ)."""
    client = member.client
    assert client.train is not None
    settings = client.settings.updated(member.config)
    return id(client.model), id(client.train.x), id(client.train.y), str(client.device), settings.loss


def _per_row_loss(name: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if name == "cross_entropy":
        return F.cross_entropy(out, target, reduction="none")
    if name == "nll":
        return F.nll_loss(out, target, reduction="none")
    rows = F.mse_loss(out, target.to(out.dtype).view_as(out), reduction="none")
    return rows.flatten(1).mean(1) if rows.dim() > 1 else rows


def _schedule(client: TorchClient, settings: TrainSettings, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's batches as TorchClient draws them: (rows [steps, width], counts [steps])."""
    batches = list(_shuffled_batches(client.train_indices, client.num_train_examples(), settings, seed))
    width = max(int(b.shape[0]) for b in batches)
    rows = torch.zeros(len(batches), width, dtype=torch.int64)
    counts = torch.empty(len(batches), dtype=torch.int64)
    for t, b in enumerate(batches):
        count = int(b.shape[0])
        rows[t, :count] = b
        counts[t] = count
    return rows, counts


def train_cohort(parameters: Parameters, members: Sequence[Member]) -> list[FitResult]:
    """Train every member's fit task on ``parameters`` at once; the results equal (up to float32
    rounding) those of each client's own ``fit``, in the order of ``members``.

    Every member must pass :func:`cohort_obstacle` and share one :func:`cohort_key`.
    """
    if not members:
        return []
    first = members[0].client
    model, device = first.model, first.device
    assert first.train is not None
    x, y = first.train.x, first.train.y
    k = len(members)

    # -- each client's schedule: batches (padded), lr, momentum, weight decay ---------------
    schedules, lrs, momenta, decays, loss_name = [], [], [], [], ""
    for member in members:
        settings = member.client.settings.updated(member.config)
        seed = _as_int(member.config.get("seed", member.client.seed))
        schedules.append(_schedule(member.client, settings, seed))
        lrs.append(settings.lr)
        momenta.append(settings.momentum)
        decays.append(settings.weight_decay)
        loss_name = settings.loss
    steps = max(rows.shape[0] for rows, _ in schedules)
    width = max(rows.shape[1] for rows, _ in schedules)
    rows_all = torch.zeros(k, steps, width, dtype=torch.int64)
    counts = torch.zeros(k, steps, dtype=torch.int64)
    for i, (rows, count) in enumerate(schedules):
        rows_all[i, : rows.shape[0], : rows.shape[1]] = rows
        counts[i, : count.shape[0]] = count
    own_steps = (counts > 0).sum(1)
    rows_all = rows_all.to(x.device)
    # weight of each row in its client's step loss: 1/count for its own rows, 0 for padding
    valid = torch.arange(width).view(1, 1, width) < counts.unsqueeze(2)
    weights = (valid.to(torch.float32) / counts.clamp(min=1).unsqueeze(2).to(torch.float32)).to(device)
    active = (counts > 0).to(device)

    # -- K stacked copies of the global model, one [K, D] block ---------------------------------
    parameters.to_module(model)
    named = list(model.named_parameters())
    sizes = [p.numel() for _, p in named]
    block = torch.empty(k, sum(sizes), dtype=torch.float32, device=device)
    stacked: dict[str, torch.Tensor] = {}
    offset = 0
    with torch.no_grad():
        for (name, p), size in zip(named, sizes):
            view = block[:, offset : offset + size]
            view.copy_(p.detach().reshape(1, -1).to(device))
            stacked[name] = view.view(k, *p.shape)
            offset += size
    lr = torch.tensor(lrs, dtype=torch.float32, device=device)
    momentum = torch.tensor(momenta, dtype=torch.float32, device=device)
    decay = torch.tensor(decays, dtype=torch.float32, device=device)
    use_momentum, use_decay = any(m != 0 for m in momenta), any(d != 0 for d in decays)
    shapes = {name: (k,) + (1,) * p.dim() for name, p in named}  # a per-client scalar broadcast per tensor
    velocity: dict[str, torch.Tensor] = {}

    def step_loss(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
                  wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = (_per_row_loss(loss_name, functional_call(model, params, (xb,)), yb) * wb).sum()
        return loss, loss.detach()

    batched_grad = vmap(grad(step_loss, has_aux=True), randomness="error")
    loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
    model.train()
    for t in range(steps):
        index = rows_all[:, t]
        xb, yb = x[index], y[index]
        if xb.device != device:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        grads, losses = batched_grad(stacked, xb, yb, weights[:, t])
        on = active[:, t]
        loss_sum += losses.to(torch.float64) * on
        scale = lr * on  # a client whose batches ran out takes no step
        # torch.optim.SGD's update (weight decay, then momentum), per tensor for all K clients at once
        with torch.no_grad():
            for name, param in stacked.items():
                g, shape = grads[name], shapes[name]
                if use_decay:
                    g = g.addcmul_(param, decay.view(shape))
                if use_momentum:
                    buffer = velocity.get(name)
                    if buffer is None:  # every client takes its first step at t = 0
                        buffer = velocity[name] = g.clone()
                    else:
                        buffer.copy_(torch.where(on.view(shape), buffer * momentum.view(shape) + g, buffer))
                    g = torch.where(momentum.view(shape) != 0, buffer, g)
                param.addcmul_(g, scale.view(shape), value=-1.0)

    # -- one FitResult per member, each viewing its row of the block ------------------------------
    flat = block.detach().cpu().numpy() if device.type != "cpu" else block.detach().numpy()
    mean_loss = (loss_sum.cpu() / own_steps.clamp(min=1).to(torch.float64)).tolist()
    specs = parameters.specs
    results = []
    for i, member in enumerate(members):
        row: np.ndarray = flat[i]
        results.append(FitResult(Parameters.from_flat(row, specs, copy=False), member.client.num_train_examples(),
                                 {"train_loss": float(mean_loss[i])}, {}))
    return results
