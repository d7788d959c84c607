"""A client's own tabular data from a CSV file: numeric feature columns and an integer label column."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from insitu.data.datasets import TensorDataset


def load_csv(path: str | Path, label_column: str = "label", num_classes: int | None = None) -> TensorDataset:
    """Read a header-row CSV; every column but ``label_column`` is a float feature.

    Labels must be integers 0..K-1 (K = ``num_classes``, default max label + 1). Features are used as
    they are: standardize them with statistics every participant agrees on before federating.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CSV file at {path}")
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path} is empty; expected a header row then one row per example")
        if label_column not in header:
            raise ValueError(f"{path} has no column {label_column!r} (columns: {', '.join(header)}); pass --label-column")
        label_at = header.index(label_column)
        features, labels = [], []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{line_no}: {len(row)} values, header has {len(header)}")
            try:
                labels.append(int(row[label_at]))
                features.append([float(v) for i, v in enumerate(row) if i != label_at])
            except ValueError as error:
                raise ValueError(f"{path}:{line_no}: {error}") from None
    if not labels:
        raise ValueError(f"{path} has a header but no examples")
    y = np.asarray(labels, dtype=np.int64)
    if y.min() < 0:
        raise ValueError(f"{path}: labels must be integers >= 0, found {int(y.min())}")
    classes = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if y.max() >= classes:
        raise ValueError(f"{path}: label {int(y.max())} is out of range for {classes} classes")
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    return TensorDataset(x, torch.from_numpy(y), classes, path.stem)
