"""A model of systems heterogeneity for simulation: how long each client's task takes, and who drops.

Real federations are not lock-step: phones and hospital servers differ in compute by orders of
magnitude, links add latency, and some devices vanish mid-task. ``SystemsModel`` gives every client a
fixed compute speed drawn from a log-normal distribution (median 1, spread ``speed_sigma``), so a
task's simulated duration is::

    latency + (local steps x step_seconds) / speed        speed ~ LogNormal(0, speed_sigma)

A local step is one minibatch, so the duration follows the work the client actually does. The
simulated clock lets synchronous rounds (which wait for the slowest sampled client) and FedBuff
(which never waits) be compared in wall-clock time, beside rounds.

Stragglers (Li et al. 2020, FedProx §5.2): each round a share of the sampled clients can only do
fewer local epochs, drawn uniformly from 1 .. E-1 (at least 1). ``drop_stragglers`` reproduces the
paper's FedAvg, which drops them; otherwise their partial work is kept (FedProx).

Every draw is a pure function of (seed, client id, task), so results do not depend on the order
tasks run in, and memory is O(1) per client.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from insitu.client.api import Config


class ClientDroppedOut(RuntimeError):
    """The systems model made this client drop out before it returned its result."""


class StragglerDropped(RuntimeError):
    """The client was a straggler this round and the strategy drops stragglers (FedAvg in Li et al. 2020)."""


StepsFn = Callable[[str, Config], int]
"""(client id, task config) -> the local steps the task takes (e.g. epochs x batches)."""


@dataclass(frozen=True)
class TaskPlan:
    """What the systems model decided for one task: its config (perhaps fewer epochs), its simulated
    duration and whether it fails (and why)."""

    config: Config
    duration: float
    failure: BaseException | None = None


@dataclass(frozen=True)
class SystemsModel:
    """Per-client speed, latency, dropouts and stragglers; see the module docstring.

    ``steps`` maps a task to its local steps (1 per task when not given); ``step_seconds`` is the
    simulated time one step takes at speed 1; ``latency`` seconds are added to every task (download
    plus upload); ``dropout`` is the chance a task is lost (the client vanishes at the end of it).
    """

    speed_sigma: float = 0.0
    step_seconds: float = 0.01
    latency: float = 0.0
    dropout: float = 0.0
    straggler_fraction: float = 0.0
    drop_stragglers: bool = False
    local_epochs: int = 1  # the epochs a task does when its config does not say
    seed: int = 0
    steps: StepsFn | None = None

    def __post_init__(self) -> None:
        for name in ("speed_sigma", "step_seconds", "latency"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.step_seconds > 0:
            raise ValueError(f"step_seconds must be > 0, got {self.step_seconds!r}")
        for name in ("dropout", "straggler_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")

    def speed(self, client_id: str) -> float:
        """The client's fixed compute speed (median 1)."""
        if self.speed_sigma == 0:
            return 1.0
        return float(np.exp(self.speed_sigma * self._rng(client_id, 0).standard_normal()))

    def plan(self, client_id: str, config: Config, task_index: int) -> TaskPlan:
        """Decide one task: stragglers get fewer epochs, then duration and dropout are drawn.

        ``task_index`` (>= 0) distinguishes the tasks of one client (e.g. the round): the same index
        gives the same plan."""
        if task_index < 0:
            raise ValueError(f"task_index must be >= 0, got {task_index}")
        rng = self._rng(client_id, 1 + task_index)
        failure: BaseException | None = None
        if self.straggler_fraction > 0 and rng.random() < self.straggler_fraction:
            epochs = int(config.get("local_epochs", self.local_epochs))  # type: ignore[arg-type]
            fewer = int(rng.integers(1, epochs)) if epochs > 1 else 1
            config = {**config, "local_epochs": fewer}
            if self.drop_stragglers:
                failure = StragglerDropped(f"client {client_id} could do only {fewer} of {epochs} local epochs "
                                           "and stragglers are dropped")
        steps = self.steps(client_id, config) if self.steps is not None else 1
        duration = self.latency + steps * self.step_seconds / self.speed(client_id)
        if failure is None and self.dropout > 0 and rng.random() < self.dropout:
            failure = ClientDroppedOut(f"client {client_id} dropped out (simulated, dropout={self.dropout})")
        return TaskPlan(config, duration, failure)

    def _rng(self, client_id: str, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(client_id.encode()), stream])


def epochs_times_batches(sizes: dict[str, int] | Callable[[str], int], default_batch: int,
                         default_epochs: int = 1) -> StepsFn:
    """A ``steps`` function for TorchClient-style training: local_epochs x ceil(examples / batch_size)."""
    size_of = sizes.__getitem__ if isinstance(sizes, dict) else sizes

    def steps(client_id: str, config: Config) -> int:
        examples = int(size_of(client_id))
        batch = int(config.get("batch_size", default_batch)) or examples  # type: ignore[arg-type]
        epochs = int(config.get("local_epochs", default_epochs))  # type: ignore[arg-type]
        return max(1, epochs * math.ceil(examples / max(batch, 1)))

    return steps
