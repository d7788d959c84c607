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

__all__ = ["MLP", "MODEL_NAMES", "LogisticRegression", "SimpleCNN", "TwoNN", "UnknownModelError", "build_model"]
