"""The record every reader returns, and the class and split rules shared by every format."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from insitu.data.datasets import _stratified_split

if TYPE_CHECKING:
    from insitu.data.files import DataSpec

#: Integer labels 0..max make max + 1 classes only up to max(MIN_CLASS_CAP, CLASS_CAP_FACTOR x the distinct labels);
#: beyond that a stray label (1000000000) would build a model of a billion outputs, so it is an error instead.
MIN_CLASS_CAP = 1000
CLASS_CAP_FACTOR = 10


class MissingDependencyError(ImportError, ValueError):
    """An optional package a format needs is not installed; a ValueError too, so the CLI prints the message
    (with the pip command) instead of a traceback."""


@dataclass
class Raw:
    """One source as read: float32 inputs (N, ...) before normalization (images in [0, 1], N x C x H x W),
    the raw labels (integers, or names), each row's group value and test flag when the source has them, the
    class names the source declares (image subfolders, a Hugging Face ClassLabel) and the unreadable files."""

    x: np.ndarray
    labels: np.ndarray
    source: str
    groups: np.ndarray | None = None
    is_test: np.ndarray | None = None
    classes: tuple[str, ...] | None = None
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if len(self.x) != n:
            raise ValueError(f"{self.source}: {len(self.x)} inputs but {n} labels")
        if n == 0:
            raise ValueError(f"{self.source} holds no examples")

    def concat(self, test: Raw) -> Raw:
        """This source as the training rows and ``test`` (a separate test path) as the test rows."""
        if test.x.shape[1:] != self.x.shape[1:]:
            raise ValueError(f"the test data {test.source} has inputs of shape {test.x.shape[1:]} but the training "
                             f"data {self.source} has {self.x.shape[1:]}: give both the same columns or image size")
        if (self.groups is None) != (test.groups is None):
            raise ValueError(f"{self.source} and {test.source} must both have the partition column, or neither")
        labels = np.concatenate([_as_names(self.labels, test.labels), _as_names(test.labels, self.labels)])
        classes = None
        if self.classes is not None or test.classes is not None:
            classes = tuple(sorted(set(self.classes or ()) | set(test.classes or ())))
        return replace(self, x=np.concatenate([self.x, test.x]), labels=labels,
                       groups=None if self.groups is None or test.groups is None else
                       np.concatenate([self.groups.astype(str), test.groups.astype(str)]),
                       is_test=np.concatenate([np.zeros(len(self.x), bool), np.ones(len(test.x), bool)]),
                       classes=classes, skipped=self.skipped + test.skipped,
                       source=f"{self.source} + {test.source}")


def _as_names(labels: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Integer labels stay integers when the other side is integers too; else both become names."""
    if np.issubdtype(labels.dtype, np.integer) and np.issubdtype(other.dtype, np.integer):
        return labels
    return labels.astype(str)


def classes_of(raw: Raw, spec: DataSpec) -> tuple[str, ...]:
    """The class names in label order: the given list, else the source's, else 0..K-1 for integer labels
    (K = num_classes or the largest + 1, refused when implausibly large), else the sorted label names."""
    if np.issubdtype(raw.labels.dtype, np.integer) and len(raw.labels) and int(raw.labels.min()) < 0:
        raise ValueError(f"{raw.source}: integer labels must be >= 0, found {int(raw.labels.min())}")
    if spec.classes:
        return tuple(spec.classes)
    if raw.classes is not None:
        return raw.classes
    if np.issubdtype(raw.labels.dtype, np.integer):
        k = int(raw.labels.max()) + 1
        if spec.num_classes is not None:
            if k > spec.num_classes:
                raise ValueError(f"{raw.source}: label {k - 1} is out of range for {spec.num_classes} classes")
            k = spec.num_classes
        elif k > max(MIN_CLASS_CAP, CLASS_CAP_FACTOR * len(np.unique(raw.labels))):
            raise ValueError(f"{raw.source}: the largest integer label is {k - 1}, which would make {k} classes for "
                             f"{len(np.unique(raw.labels))} distinct label value(s): check the label column (a stray "
                             "value or an ID column?), or give the classes with --classes / --num-classes")
        return tuple(str(i) for i in range(k))
    return tuple(sorted(set(raw.labels.astype(str).tolist())))


def labels_to_indices(labels: np.ndarray, classes: tuple[str, ...], source: str) -> np.ndarray:
    """Each label's position in ``classes`` (matched by name); a label not in the list is an error naming it."""
    names = labels.astype(str)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(names.tolist()) - set(index))
    if unknown:
        shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise ValueError(f"{source}: label(s) {shown} are not among the classes ({', '.join(classes)}): add them to "
                         "--classes (every party must list the same classes in the same order)")
    lookup = np.asarray([index[n] for n in np.unique(names)], dtype=np.int64)
    _, inverse = np.unique(names, return_inverse=True)
    return lookup[inverse.reshape(-1)]


def stratified_test_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the rows held out as the test split: round(fraction x class size) random rows of each class."""
    _, codes = np.unique(labels.astype(str), return_inverse=True)
    _, test_idx = _stratified_split(codes.reshape(-1).astype(np.int64), fraction, seed)
    mask = np.zeros(len(labels), dtype=bool)
    mask[test_idx] = True
    return mask
