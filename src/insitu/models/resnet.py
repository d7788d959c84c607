"""ResNet-18 (He et al. 2016, "Deep Residual Learning for Image Recognition"), without torchvision.

The standard BasicBlock network, stages of [2, 2, 2, 2] blocks at 64/128/256/512 channels, with the
same module and state_dict names as torchvision's ``resnet18`` (``conv1``, ``bn1``, ``layer1.0.conv1``,
..., ``fc``), so a batch-norm, standard-stem instance loads torchvision's weights with ``load_state_dict``.

Two choices matter for federated learning:

- ``norm="group"`` (the default for the registered ``resnet18``): GroupNorm (Wu & He 2018) normalizes
  each example by itself and has no running statistics. BatchNorm keeps ``running_mean``/``running_var``
  buffers that insitu's ``Parameters`` carry and FedAvg averages like weights (a mean of per-hospital
  statistics, which is not the statistics of the pooled data when hospitals differ), and its batch
  statistics mix examples, which per-example DP-SGD (Opacus) refuses. GroupNorm keeps the same
  trainable parameters (a weight and a bias per channel), so the parameter count is unchanged.
- ``stem="small"``: a 3x3 stride-1 convolution and no max-pool, for 32-64 px inputs (as in CIFAR
  ResNets); the standard 7x7 stride-2 convolution plus max-pool shrinks a 32 px image to 8 px
  before the first block. ``stem="auto"`` picks small below 64 px; from 64 px on the standard stem
  (16x16 maps at 64 px) costs about a quarter of the small stem at 32 px (on CPU, measured).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NORMS = ("group", "batch")
STEMS = ("standard", "small", "auto")
GROUPS = 32  # GroupNorm groups (Wu & He 2018's default); at least 2 channels per group in narrow networks


def _norm_factory(norm: str) -> Callable[[int], nn.Module]:
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda channels: nn.GroupNorm(min(GROUPS, max(1, channels // 2)), channels)
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 projection when the shape changes)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                            norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _stage(in_channels: int, channels: int, stride: int, norm: Callable[[int], nn.Module]) -> nn.Sequential:
    """Two BasicBlocks; the first changes the width and the resolution."""
    return nn.Sequential(BasicBlock(in_channels, channels, stride, norm), BasicBlock(channels, channels, 1, norm))


class ResNet18(nn.Module):
    """ResNet-18 for ``in_channels`` x H x W images and ``num_classes`` classes.

    ``norm``: "group" (GroupNorm, no running statistics: suits FedAvg and DP-SGD) or "batch".
    ``stem``: "standard" (7x7/2 conv + 3x3/2 max-pool, for ~224 px), "small" (3x3/1 conv, no pool,
    for 32-64 px). ``width``: channels of the first stage (64 in the paper; the stages have 1, 2, 4 and 8
    times as many); 16 keeps the depth and the shape of the network at 1/16 of its parameters and compute, for
    CPU-only demos. Layer names follow torchvision's, the GroupNorm layers keeping the ``bn`` names.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, *, norm: str = "group",
                 stem: str = "standard", width: int = 64) -> None:
        super().__init__()
        if stem not in ("standard", "small"):
            raise ValueError(f"unknown stem {stem!r}; choose standard or small")
        if in_channels < 1 or num_classes < 1 or width < 1:
            raise ValueError(f"in_channels, num_classes and width must be >= 1, got {in_channels}, {num_classes} "
                             f"and {width}")
        make_norm = _norm_factory(norm)
        self.norm, self.stem, self.width = norm, stem, width
        if stem == "standard":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = make_norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(width, width, 1, make_norm)
        self.layer2 = _stage(width, 2 * width, 2, make_norm)
        self.layer3 = _stage(2 * width, 4 * width, 2, make_norm)
        self.layer4 = _stage(4 * width, 8 * width, 2, make_norm)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        for module in self.modules():  # torchvision's initialization
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(input_shape: tuple[int, ...], num_classes: int, *, norm: str = "group", stem: str = "auto",
             width: int = 64) -> ResNet18:
    """A ResNet-18 for images of ``input_shape`` (C, H, W); ``stem="auto"``: small below 64 px, else standard."""
    if len(input_shape) != 3:
        raise ValueError(f"resnet18 expects images (channels, height, width), the dataset gives {tuple(input_shape)}; "
                         "use 'mlp' or 'logreg' for tables")
    channels, height, side = input_shape
    if stem == "auto":
        stem = "small" if min(height, side) < 64 else "standard"
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    return ResNet18(channels, num_classes, norm=norm, stem=stem, width=width)
