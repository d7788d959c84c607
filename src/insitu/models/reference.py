"""Reference models: the seeds' SimpleCNN, McMahan et al.'s 2NN, and small tabular models."""

from __future__ import annotations

import math

import torch
from torch import nn


class SimpleCNN(nn.Module):
    """conv32-conv64-fc128-fc10 for 1x28x28 images; same layer names as the seeds' model.py, so
    a saved insitu model loads into the tutorial's class with ``load_state_dict``. Other image shapes
    (C x H x W, H and W >= 4: your own image folders) change only conv1's input channels and fc1's width."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, height: int = 28, width: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (height // 4) * (width // 4), 128)
        self.fc2 = nn.Linear(128, num_classes)
        self.pool = nn.MaxPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.flatten(1)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)


class TwoNN(nn.Module):
    """The "2NN" of McMahan et al. (2017): two hidden layers of 200 ReLU units."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: int = 200) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class LogisticRegression(nn.Module):
    """Multinomial logistic regression (one linear layer on flattened inputs)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """A small one-hidden-layer perceptron for tabular data."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


MODEL_NAMES = ("simple-cnn", "2nn", "logreg", "mlp", "simple-net", "resnet18", "resnet18-bn", "resnet18-w16")


class UnknownModelError(ValueError):
    """A model name that is not in the registry."""


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Instantiate a reference model by name for inputs of ``input_shape`` (without batch dim)."""
    key = name.lower().replace("_", "-")
    in_features = math.prod(input_shape)
    if key in ("simple-cnn", "cnn"):
        if len(input_shape) != 3 or min(input_shape[1:]) < 4:
            raise ValueError(f"simple-cnn expects 1x28x28 images (or any C x H x W of at least 4x4 pixels), the "
                             f"dataset gives {tuple(input_shape)}; use 'mlp' or 'logreg'")
        return SimpleCNN(num_classes, *input_shape)
    if key == "2nn":
        return TwoNN(in_features, num_classes)
    if key == "logreg":
        return LogisticRegression(in_features, num_classes)
    if key == "mlp":
        return MLP(in_features, num_classes)
    if key == "simple-net":  # the Flower tutorials' SimpleNet (784-128-10): same arrays, same order as MLP's
        return MLP(in_features, num_classes, hidden=128)
    if key in ("resnet18", "resnet18-bn", "resnet18-w16"):  # GroupNorm unless -bn; -w16: 16 channels wide, not 64
        from insitu.models.resnet import resnet18

        return resnet18(tuple(input_shape), num_classes, norm="batch" if key == "resnet18-bn" else "group",
                        width=16 if key == "resnet18-w16" else 64)
    raise UnknownModelError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
