"""Reference models."""

from insitu.models.reference import (
    MLP,
    MODEL_NAMES,
    LogisticRegression,
    SimpleCNN,
    TwoNN,
    UnknownModelError,
    build_model,
)
from insitu.models.resnet import ResNet18, resnet18

__all__ = ["MLP", "MODEL_NAMES", "LogisticRegression", "ResNet18", "SimpleCNN", "TwoNN", "UnknownModelError", "build_model", "resnet18"]
