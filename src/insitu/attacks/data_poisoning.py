"""Data-poisoning attacks: a malicious client trains honestly on data it has tampered with.

* :func:`flip_labels`: the label-flipping attack, ``y -> C - 1 - y``.
* :class:`Trigger` and :func:`poison_with_backdoor`: a pixel-pattern backdoor (Gu et al. 2017,
  "BadNets"; Bagdasaryan et al. 2020): a bright square in a corner makes the model predict a
  chosen target class, while clean inputs are still classified normally.
* :func:`triggered_test_set` and :func:`attack_success_rate`: measure whether the backdoor took.

Every function returns new tensors and leaves its input dataset untouched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from insitu.client.torch_client import evaluate_model
from insitu.data.datasets import TensorDataset

__all__ = [
    "Trigger",
    "attack_success_rate",
    "flip_labels",
    "poison_with_backdoor",
    "triggered_test_set",
]


def flip_labels(data: TensorDataset, num_classes: int | None = None) -> TensorDataset:
    """A copy of ``data`` with every label ``y`` replaced by ``C - 1 - y`` (label-flipping attack)."""
    c = data.num_classes if num_classes is None else num_classes
    if isinstance(c, bool) or not isinstance(c, int) or c < 2:
        raise ValueError(f"flip_labels needs num_classes >= 2, got {c!r}")
    if len(data) and (int(data.y.min()) < 0 or int(data.y.max()) >= c):
        raise ValueError(
            f"flip_labels: labels must lie in [0, {c}), got min {int(data.y.min())}, max {int(data.y.max())}"
        )
    return dataclasses.replace(data, x=data.x.clone(), y=(c - 1) - data.y)


@dataclass(frozen=True)
class Trigger:
    """A ``size`` x ``size`` square at the bottom-right corner of each image, set to ``value``.

    ``value=None`` means the largest value in the data, i.e. a saturated (white) patch whatever
    the normalization. Works on images ``(N, C, H, W)`` or ``(N, H, W)``, and on flat square
    images ``(N, H*H)`` such as digits (8x8 = 64) or flattened MNIST (784).
    """

    size: int = 4
    value: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"Trigger size must be an int >= 1, got {self.size!r}")
        if self.value is not None and not math.isfinite(self.value):
            raise ValueError(f"Trigger value must be finite (or None for the data's max), got {self.value!r}")

    def resolved(self, x: torch.Tensor) -> Trigger:
        """This trigger with ``value`` fixed to ``x``'s maximum if it was None (one value for all rows)."""
        if self.value is not None or x.numel() == 0:
            return self
        return dataclasses.replace(self, value=self._value_for(x))

    def _value_for(self, x: torch.Tensor) -> float:
        """``value``, or ``x``'s maximum if it is None (``x`` must not be empty)."""
        return self.value if self.value is not None else float(x.max())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` (a batch of images) with the trigger stamped on every image."""
        images = _as_images(x)  # validates the shape even for an empty batch
        height, width = images.shape[-2:]
        if self.size > min(height, width):
            raise ValueError(f"Trigger of size {self.size} does not fit images of {height}x{width} pixels")
        out = x.clone(memory_format=torch.contiguous_format)
        if out.numel() == 0:
            return out
        value = self._value_for(x)
        _as_images(out)[..., height - self.size :, width - self.size :] = value
        return out


def _as_images(x: torch.Tensor) -> torch.Tensor:
    """``x`` viewed as images whose last two dims are (H, W); refuses inputs that are not images."""
    if x.dim() >= 3:
        return x
    if x.dim() == 2:
        features = int(x.shape[1])
        side = math.isqrt(features)
        if features > 0 and side * side == features:
            return x.view(x.shape[0], side, side)
    raise ValueError(
        f"the pixel-pattern backdoor needs image data: inputs of shape {tuple(x.shape[1:])} are neither "
        "images (C, H, W) / (H, W) nor flat square images (H*H values, e.g. 64 for digits, 784 for MNIST). "
        "For tabular data use label_flip or a model-poisoning attack instead."
    )


def _check_target(data: TensorDataset, target: int) -> None:
    """Reject a backdoor target class that the dataset does not have."""
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= target < data.num_classes:
        raise ValueError(f"backdoor target must be a class in [0, {data.num_classes}), got {target!r}")


def poison_with_backdoor(
    data: TensorDataset, trigger: Trigger, target: int, fraction: float = 0.5, seed: int = 0
) -> TensorDataset:
    """A copy of ``data`` whose ``round(fraction * N)`` rows (chosen by ``seed``) carry the trigger and label ``target``.

    The other rows stay clean, so the attacker's update still looks like an honest one.
    """
    _check_target(data, target)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"backdoor fraction must lie in [0, 1], got {fraction!r}")
    n = len(data)
    count = round(float(fraction) * n)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))
    index = torch.from_numpy(rows.astype(np.int64))
    x, y = data.x.clone(), data.y.clone()
    if count:
        trigger = trigger.resolved(data.x)  # same patch value whichever rows were drawn
        x[index.to(x.device)] = trigger.apply(x.index_select(0, index.to(x.device)))
        y[index.to(y.device)] = int(target)
    else:
        _as_images(x)  # still refuse tabular data, whatever the fraction
    return dataclasses.replace(data, x=x, y=y)


def triggered_test_set(test: TensorDataset, trigger: Trigger, target: int) -> TensorDataset:
    """The test rows whose true label is not ``target``, triggered and relabelled ``target``."""
    _check_target(test, target)
    keep = torch.nonzero(test.y != int(target)).reshape(-1)
    x = trigger.resolved(test.x).apply(test.x.index_select(0, keep.to(test.x.device)))
    y = torch.full((len(keep),), int(target), dtype=torch.int64, device=test.y.device)
    return dataclasses.replace(test, x=x, y=y)


def attack_success_rate(
    model: nn.Module,
    test: TensorDataset,
    trigger: Trigger,
    target: int,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> float:
    """Fraction of triggered non-target test images that ``model`` classifies as ``target`` (backdoor ASR)."""
    triggered = triggered_test_set(test, trigger, target)
    if len(triggered) == 0:
        raise ValueError(f"attack_success_rate: every test label is the target {target}; nothing to measure")
    _, accuracy, _ = evaluate_model(model, triggered, batch_size=batch_size, device=device)
    return accuracy
