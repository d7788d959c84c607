"""NumPy ``.npz`` archives: inputs and labels under configurable keys, read without pickle."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from insitu.data.files.raw import Raw

if TYPE_CHECKING:
    from insitu.data.files import DataSpec


def read_npz(path: Path, spec: DataSpec) -> Raw:
    """``x`` (N, ...) and ``y`` (N,) under ``spec.x_key``/``spec.y_key``; ``<x_key>_test``/``<y_key>_test`` are the
    test split when present; ``spec.partition_by`` names a key with each row's group.

    Integer (uint8) inputs of 3 or 4 dimensions are images: scaled to [0, 1], N x H x W gains a channel, and
    N x H x W x C (a last dimension of 1, 3 or 4, smaller than the second unless that is not 1, 3 or 4)
    becomes N x C x H x W. Object arrays are refused (``allow_pickle=False``).
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable .npz archive: {error}") from None
    with archive:
        keys = list(archive.files)

        def get(key: str, flag: str) -> np.ndarray:
            if key not in keys:
                raise ValueError(f"{path} has no array {key!r} (arrays: {', '.join(keys)}): pass {flag}")
            try:
                return np.asarray(archive[key])
            except ValueError as error:  # object arrays need pickle, which is never allowed
                raise ValueError(f"{path}: array {key!r} cannot be read without pickle ({error}); store numbers "
                                 "or strings, not Python objects") from None

        x, y = get(spec.x_key, "--x-key"), get(spec.y_key, "--y-key")
        groups = get(spec.partition_by, "--partition-by") if spec.partition_by else None
        is_test = None
        x_test_key, y_test_key = f"{spec.x_key}_test", f"{spec.y_key}_test"
        if x_test_key in keys and y_test_key in keys:
            x_test, y_test = get(x_test_key, "--x-key"), get(y_test_key, "--y-key")
            if groups is not None:
                groups = np.concatenate([groups, get(f"{spec.partition_by}_test", "--partition-by")])
            is_test = np.concatenate([np.zeros(len(x), bool), np.ones(len(x_test), bool)])
            x, y = np.concatenate([x, x_test]), np.concatenate([y, y_test])
    if y.ndim != 1:
        raise ValueError(f"{path}: labels {spec.y_key!r} must be 1-D, got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype.kind in "US"):
        raise ValueError(f"{path}: labels {spec.y_key!r} must be integers or strings, got {y.dtype}")
    if groups is not None and len(groups) != len(y):
        raise ValueError(f"{path}: {spec.partition_by!r} has {len(groups)} values for {len(y)} examples")
    return Raw(_inputs(x, path, spec.x_key), y.astype(np.int64) if y.dtype.kind in "iu" else y.astype(str),
               str(path), groups=None if groups is None else groups.astype(str), is_test=is_test)


def _inputs(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if x.ndim < 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(f"{path}: inputs {key!r} must be a numeric array of shape (N, ...), got {x.dtype} "
                         f"{x.shape}")
    image = np.issubdtype(x.dtype, np.integer) and x.ndim in (3, 4)
    if x.ndim == 3 and image:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and (x.shape[1] not in (1, 3, 4) or x.shape[1] > x.shape[-1]):
        x = x.transpose(0, 3, 1, 2)
    out = np.ascontiguousarray(x, dtype=np.float32)
    if image and x.dtype == np.uint8:
        out *= np.float32(1.0 / 255.0)
    if not np.isfinite(out).all():
        raise ValueError(f"{path}: inputs {key!r} hold {int((~np.isfinite(out)).sum())} NaN or infinite values")
    return out
