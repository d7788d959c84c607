"""Local (example-level) differential privacy: DP-SGD in each client, through Opacus.

A :class:`DPTorchClient` trains like :class:`~insitu.client.TorchClient` but with DP-SGD: batches
are Poisson-sampled (each local example joins each step independently with probability ``q``),
every example's gradient is clipped to L2 norm ``max_grad_norm`` (C), and Gaussian noise of
standard deviation ``noise_multiplier * C`` is added to the sum before the optimizer step. The
guarantee is per client and per example: whatever the server (or anyone who sees the client's
updates) learns, it could have learned almost as well had any one training example of that client
been left out. Each client keeps its own RDP ledger, the list of ``(noise_multiplier, q, steps)``
it has run, in its state store, and reports its accumulated ``epsilon`` (at its ``delta``) with
every result; with a ``target_epsilon`` it refuses a round that would overspend.

DP-SGD is a loop plug-in (:class:`DPSGD`) of TorchClient's one training loop: it draws the
Poisson batches and takes the clipped, noised steps; the client algorithm the task names (FedProx,
SCAFFOLD) runs in the same loop on the noised gradient. Several virtual clients may share one model
object (the simulation does). Opacus' per-sample gradient hooks are therefore attached for one fit
only and removed afterwards, together with every attribute Opacus puts on the parameters, so the
shared model is a plain module again between fits.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from insitu.algorithms import GradHook, algorithm_for
from insitu.client.api import Config, FitResult
from insitu.client.state import ClientState
from insitu.client.torch_client import Steps, TorchClient, TrainSettings
from insitu.params import Parameters, flatten_module_
from insitu.privacy.accountant import RDPAccountant

if TYPE_CHECKING:
    from insitu.data.datasets import TensorDataset

log = logging.getLogger("insitu")

DP_LEDGER = "dp_rdp_ledger"  # client state: flat float32 [sigma, q, steps, sigma, q, steps, ...]
_EXACT_STEPS = 2**24  # float32 holds step counts exactly up to here; larger runs start a new entry
# Attributes Opacus leaves on parameters (GradSampleModule's plus DPOptimizer's ``summed_grad``).
_OPACUS_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")

# ... and on modules (the activations its forward hooks keep, its hook handles).
_OPACUS_MODULE_ATTRS = ("activations", "autograd_grad_sample_hooks", "ft_compute_sample_grad", "max_batch_len")

LedgerEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), as RDPAccountant.history


@dataclass(frozen=True)
class LocalDPSettings:
    """DP-SGD parameters a client keeps for itself (the server cannot override them by config).

    ``noise_multiplier`` (sigma) scales the Gaussian noise to ``sigma * max_grad_norm``;
    ``max_grad_norm`` (C) is the per-example gradient clipping bound; ``delta`` is the
    (epsilon, delta)-DP delta the client reports epsilon at (pick it well below 1/n);
    ``target_epsilon``, if set, is the budget: a round that would take the client past it is refused.
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5
    target_epsilon: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {self.noise_multiplier} "
                             "(without noise there is no privacy guarantee: epsilon would be infinite; "
                             "train with a plain TorchClient instead)")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm (the per-example clipping bound C) must be a finite number > 0, "
                             f"got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must lie strictly between 0 and 1, got {self.delta}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0 (or None for no budget), got {self.target_epsilon}")


class PrivacyBudgetExceededError(RuntimeError):
    """A client refuses a round because it would spend more than its ``target_epsilon``."""


class UnsupportedModelError(ValueError):
    """A model Opacus cannot compute per-example gradients for (BatchNorm, for one)."""


# -- models ----------------------------------------------------------------------------------

_FIXED: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def _architecture_errors(model: nn.Module) -> list:
    """Opacus' complaints about the layers, in training mode (an eval-mode model is not an error:
    a shared model is left in eval mode by the last evaluation)."""
    was_training = model.training
    model.train()
    try:
        return ModuleValidator.validate(model, strict=False)
    finally:
        model.train(was_training)


def dp_compatible_model(model: nn.Module, *, fix: bool = False) -> nn.Module:
    """``model`` itself if Opacus can train it; else its fixed copy (``fix=True``) or an error.

    Fixing (``ModuleValidator.fix``: BatchNorm becomes GroupNorm, and so on) returns a *different*
    model with different layers and parameter names, so the server and every client must use the
    same fixed model: build the global model with this function too. The fixed copy is cached per
    original model, so virtual clients sharing one model also share one fixed copy.
    """
    errors = _architecture_errors(model)
    if not errors:
        return model
    if not fix:
        listed = "; ".join(str(e) for e in errors)
        raise UnsupportedModelError(
            f"Opacus cannot train {type(model).__name__} with per-example gradients: {listed}. Pass "
            "fix_model=True (or use dp_compatible_model(model, fix=True) for the server's model too) to "
            "replace the offending layers, e.g. BatchNorm with GroupNorm; this changes the architecture")
    fixed = _FIXED.get(model)
    if fixed is None:
        fixed = ModuleValidator.fix(model)
        remaining = _architecture_errors(fixed)
        if remaining:
            raise UnsupportedModelError(f"Opacus could not fix {type(model).__name__}: "
                                        + "; ".join(str(e) for e in remaining))
        if getattr(model, "_insitu_flat", None) is not None:
            flatten_module_(fixed)  # keep the one-copy load/snapshot of a flattened shared model
        log.warning("local DP: %s changed by Opacus' fixer (%s); the server must use the same fixed model",
                    type(model).__name__, "; ".join(type(e).__name__ for e in errors))
        _FIXED[model] = fixed
    return fixed


# -- accounting -----------------------------------------------------------------------------

def sampling_plan(num_examples: int, settings: TrainSettings) -> tuple[float, int]:
    """(sample rate q, steps per epoch) the way Opacus' DPDataLoader picks them.

    Steps per epoch = ceil(n / batch_size) and q = 1 / steps, so about ``batch_size`` examples per
    step on average; ``batch_size=0`` (the whole local set) means q = 1 and one step per epoch.
    """
    if num_examples <= 0:
        return 0.0, 0
    batch = settings.batch_size or num_examples
    steps = math.ceil(num_examples / batch)
    return 1.0 / steps, steps


def epsilon(ledger: Sequence[LedgerEntry], delta: float) -> float:
    """Epsilon at ``delta`` of running every ``(noise_multiplier, q, steps)`` in ``ledger``
    (insitu's RDP accountant, the same analysis as Opacus')."""
    return RDPAccountant(history=list(ledger)).epsilon(float(delta)) if ledger else 0.0


def _as_stored(entry: LedgerEntry) -> LedgerEntry:
    """The entry as it reads back from a float32 state store (so live and stored ledgers agree)."""
    sigma, q, steps = entry
    return float(np.float32(sigma)), float(np.float32(q)), int(steps)


def _extended(ledger: Sequence[LedgerEntry], entry: LedgerEntry) -> list[LedgerEntry]:
    """``ledger`` plus ``entry``, merged into the last entry when sigma and q are the same."""
    out = list(ledger)
    if entry[2] <= 0:
        return out
    entry = _as_stored(entry)
    if out and out[-1][:2] == entry[:2] and out[-1][2] + entry[2] <= _EXACT_STEPS:
        out[-1] = (entry[0], entry[1], out[-1][2] + entry[2])
    else:
        out.append(entry)
    return out


def load_ledger(state: ClientState) -> list[LedgerEntry]:
    """The client's stored ledger; a damaged one is an error, never silently reset (that would under-count)."""
    raw = state.load(DP_LEDGER)
    if raw is None:
        return []
    values = np.asarray(raw, dtype=np.float64).reshape(-1)
    if values.size % 3 or not np.all(np.isfinite(values)):
        raise ValueError(f"the stored privacy ledger {DP_LEDGER!r} is damaged ({values.size} values); refusing to "
                         "train rather than under-count this client's epsilon")
    ledger = [(float(s), float(q), int(np.rint(t))) for s, q, t in values.reshape(-1, 3)]
    if any(not (s > 0 and 0 < q <= 1 and t > 0) for s, q, t in ledger):
        raise ValueError(f"the stored privacy ledger {DP_LEDGER!r} holds invalid entries {ledger}; refusing to train")
    return ledger


def save_ledger(state: ClientState, ledger: Sequence[LedgerEntry]) -> None:
    """Store the ledger as one small float32 vector ``[sigma, q, steps, ...]``."""
    state.save(DP_LEDGER, np.asarray([v for entry in ledger for v in entry], dtype=np.float32))


# -- the loop plug-in -----------------------------------------------------------------------

class DPSGD:
    """DP-SGD steps for TorchClient's loop: Poisson-sampled batches (rate q, see :func:`sampling_plan`),
    each example's gradient clipped to ``max_grad_norm``, Gaussian noise added to the sum.

    The sampling and the noise draw on fresh OS randomness each fit, never on the server's ``seed``:
    someone who knows the noise can subtract it. ``rng_seed`` fixes both, for tests only.
    """

    def __init__(self, dp: LocalDPSettings, rng_seed: int | None = None) -> None:
        self.dp = dp
        self.rng_seed = rng_seed

    def _generators(self, seed: int) -> tuple[torch.Generator, torch.Generator]:
        """(sampling, noise) generators: OS entropy, or ``rng_seed`` mixed with the task's seed."""
        if self.rng_seed is None:
            return (torch.Generator().manual_seed(secrets.randbits(63)),
                    torch.Generator().manual_seed(secrets.randbits(63)))
        base = (self.rng_seed * 1_000_003 + seed) % (2**62)
        return torch.Generator().manual_seed(base), torch.Generator().manual_seed(base + 1)

    @contextmanager
    def open(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
             index: torch.Tensor | None, num_examples: int, settings: TrainSettings, seed: int) -> Iterator[Steps]:
        """Opacus' per-example gradients on ``model`` and its DPOptimizer around ``optimizer``, for one
        fit; both are taken off again on exit, whatever happened."""
        reduction = getattr(loss_fn, "reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"DP-SGD needs a loss with reduction 'mean' or 'sum', got {reduction!r}")
        n = num_examples
        q, per_epoch = sampling_plan(n, settings)
        sampler, noise = self._generators(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=self.dp.noise_multiplier,
                                   max_grad_norm=self.dp.max_grad_norm, expected_batch_size=n * q,
                                   loss_reduction=reduction, generator=noise)

        def batches() -> Iterator[torch.Tensor]:
            for _ in range(settings.local_epochs * per_epoch):
                rows = torch.arange(n) if q >= 1 else torch.nonzero(torch.rand(n, generator=sampler) < q).view(-1)
                yield rows if index is None else index[rows]

        def step(after_backward: GradHook | None, empty: bool) -> None:
            if empty:  # Poisson sampling may draw no one: the step still adds noise
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
            if dp_optimizer.pre_step():  # clip each example's gradient, sum, add noise, scale
                if after_backward is not None:
                    after_backward()
                dp_optimizer.original_optimizer.step()

        with warnings.catch_warnings():
            # The first layer's input needs no gradient, so torch warns about its full backward hook: harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            gsm = GradSampleModule(model, batch_first=True, loss_reduction=reduction, strict=True)
            try:
                gsm.train()
                yield Steps(gsm, dp_optimizer, batches(), step)
            finally:
                dp_optimizer.zero_grad(set_to_none=True)
                gsm._close()  # removes the hooks and the per-sample attributes Opacus put on the parameters
                _strip_opacus(model)


# -- the client -----------------------------------------------------------------------------

class DPTorchClient(TorchClient):
    """A :class:`TorchClient` that trains with DP-SGD (Opacus) and reports its ``epsilon`` each round.

    ``dp`` holds sigma, C, delta and the optional budget; the server's config may still change
    ``lr``, ``local_epochs``, ``batch_size`` and the like (they are accounted for honestly). State
    (``MemoryStates().for_client(cid)`` in simulation, ``DiskState(folder)`` deployed) carries the
    privacy ledger between rounds; without one the ledger lives only as long as this object.

    The noise and the batch sampling draw on fresh OS randomness each round (see :class:`DPSGD`);
    ``rng_seed`` fixes both, for tests only.
    The mean training loss is not noised, so it is left out of the metrics unless
    ``report_train_loss=True`` (which leaks a little outside the epsilon).
    """

    def __init__(
        self,
        model: nn.Module,
        train: TensorDataset | None,
        test: TensorDataset | None = None,
        *,
        dp: LocalDPSettings,
        fix_model: bool = False,
        report_train_loss: bool = False,
        rng_seed: int | None = None,
        state: ClientState | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(dp_compatible_model(model, fix=fix_model), train, test, state=state,
                         loop_plugin=DPSGD(dp, rng_seed), **kwargs)  # type: ignore[arg-type]
        self.dp = dp
        self.report_train_loss = report_train_loss
        self._ledger: list[LedgerEntry] = []  # used when there is no state store

    # -- accounting --------------------------------------------------------------------------
    def ledger(self) -> list[LedgerEntry]:
        """Every (noise_multiplier, sample_rate, steps) this client has trained with so far."""
        return load_ledger(self.state) if self.state is not None else list(self._ledger)

    def epsilon(self) -> float:
        """Epsilon spent so far, at ``dp.delta``."""
        return epsilon(self.ledger(), self.dp.delta)

    # -- Client protocol ---------------------------------------------------------------------
    def fit(self, parameters: Parameters, config: Config) -> FitResult:
        algorithm_for(config)  # a task this client must refuse spends none of its budget
        settings = self.settings.updated(config)
        q, per_epoch = sampling_plan(self.num_train_examples(), settings)
        ledger = self.ledger()
        planned = _extended(ledger, (self.dp.noise_multiplier, q, per_epoch * settings.local_epochs))
        after = epsilon(planned, self.dp.delta)
        budget = self.dp.target_epsilon
        if budget is not None and after > budget:
            spent = epsilon(ledger, self.dp.delta)
            raise PrivacyBudgetExceededError(
                f"privacy budget: this client has spent epsilon={spent:.4g} of its target_epsilon={budget:g} "
                f"(delta={self.dp.delta:g}); this round ({settings.local_epochs} epoch(s), "
                f"{per_epoch * settings.local_epochs} steps at q={q:.4g}, sigma={self.dp.noise_multiplier:g}) would "
                f"bring it to {after:.4g}, so it refuses to train")
        # Charged before training: a round that fails half-way is counted, never under-counted.
        if self.state is not None:
            save_ledger(self.state, planned)
        else:
            self._ledger = planned
        result = super().fit(parameters, config)
        if not self.report_train_loss:
            result.metrics.pop("train_loss", None)
        result.metrics["epsilon"] = after
        result.metrics["delta"] = float(self.dp.delta)
        return result


def _strip_opacus(model: nn.Module) -> None:
    """Remove whatever Opacus attached to ``model`` so the (shared) model is a plain module again."""
    for p in model.parameters():
        for attr in _OPACUS_PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
    for module in model.modules():
        for attr in _OPACUS_MODULE_ATTRS:
            if attr in module.__dict__:
                delattr(module, attr)
        if not module._backward_hooks and not module._backward_pre_hooks:
            module._is_full_backward_hook = None  # as torch leaves a module that never had one
