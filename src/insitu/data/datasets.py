"""Datasets for insitu: a tensor-backed container and loaders for the built-in datasets.

Every dataset is materialized as two tensors (inputs and labels) so that clients can
slice their shard with a single ``index_select`` instead of per-sample Python calls.

Built-in datasets:

* ``digits`` and ``breast-cancer`` ship with scikit-learn, need no download and are the
  defaults for quick runs. They have no official split, so a fixed stratified 80/20
  split (with an internal seed independent of any run seed) is used.
* ``mnist`` and ``fashion-mnist`` are read from the standard IDX files (gzip or raw)
  that the user provides; :func:`download_idx` fetches them for users. Nothing here
  downloads implicitly.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import shutil
import tempfile
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASET_NAMES",
    "DatasetNotFoundError",
    "TensorDataset",
    "UnknownDatasetError",
    "default_data_dir",
    "download_idx",
    "load_dataset",
]

DATASET_NAMES: tuple[str, ...] = ("digits", "breast-cancer", "mnist", "fashion-mnist")
SPLITS: tuple[str, ...] = ("train", "test")

#: Environment variable consulted when no ``data_dir`` is passed.
DATA_DIR_ENV = "INSITU_DATA_DIR"

IndexLike = np.ndarray | Sequence[int] | torch.Tensor


# --------------------------------------------------------------------------- container


@dataclass(frozen=True, eq=False)
class TensorDataset:
    """A labelled dataset held as two tensors, sliced by index (no per-sample Python).

    ``x`` is float32 with shape ``(N, ...)``, already normalized; ``y`` is int64 with
    shape ``(N,)``. Equality is identity (``eq=False``): comparing tensors element-wise
    inside a generated ``__eq__`` would be ambiguous.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise TypeError("TensorDataset.x and .y must be torch.Tensor objects")
        if self.y.dim() != 1:
            raise ValueError(f"TensorDataset.y must be 1-D, got shape {tuple(self.y.shape)}")
        if self.x.dim() < 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"TensorDataset.x and .y disagree on the number of samples: "
                f"x has shape {tuple(self.x.shape)}, y has shape {tuple(self.y.shape)}"
            )
        if self.y.dtype != torch.int64:
            raise TypeError(f"TensorDataset.y must be int64, got {self.y.dtype}")
        if not self.x.is_floating_point():
            raise TypeError(f"TensorDataset.x must be a floating tensor, got {self.x.dtype}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return (
            f"TensorDataset(name={self.name!r}, n={len(self)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, i.e. ``x.shape[1:]``."""
        return tuple(int(d) for d in self.x.shape[1:])

    def subset(self, indices: IndexLike) -> TensorDataset:
        """Return the samples at ``indices`` (integer positions) as a new dataset.

        Uses ``index_select`` so the result is a contiguous copy; name and class count
        are kept. Boolean masks are rejected because they would silently be read as 0/1.
        """
        idx = _as_index_tensor(indices, len(self))
        return dataclasses.replace(
            self,
            x=self.x.index_select(0, idx.to(self.x.device)),
            y=self.y.index_select(0, idx.to(self.y.device)),
        )

    def labels_numpy(self) -> np.ndarray:
        """Labels as an int64 numpy array (a copy when ``y`` lives off the CPU)."""
        return self.y.detach().cpu().numpy().astype(np.int64, copy=False)


def _as_index_tensor(indices: IndexLike, n: int) -> torch.Tensor:
    if isinstance(indices, torch.Tensor):
        t = indices.detach().cpu()
        if t.dtype == torch.bool:
            raise TypeError("subset() takes integer indices, not a boolean mask")
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"subset() takes integer indices, got a {t.dtype} tensor")
        t = t.reshape(-1).to(torch.int64)
    else:
        arr = np.asarray(indices)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype == np.bool_:
            raise TypeError("subset() takes integer indices, not a boolean mask")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"subset() takes integer indices, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr.reshape(-1), dtype=np.int64))
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise IndexError(
            f"subset() index out of range: indices must lie in [0, {n}), "
            f"got min {int(t.min())}, max {int(t.max())}"
        )
    return t


# --------------------------------------------------------------------------- errors


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset's files are not on disk; the message says where we looked
    and how to obtain the files."""


class UnknownDatasetError(ValueError):
    """Raised for a dataset name that is not one of :data:`DATASET_NAMES`."""


# --------------------------------------------------------------------------- names

_ALIASES: dict[str, str] = {
    "digits": "digits",
    "breast-cancer": "breast-cancer",
    "breastcancer": "breast-cancer",
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
}


def _canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise UnknownDatasetError(
            f"dataset name must be a string, got {type(name).__name__}; "
            f"valid names: {', '.join(DATASET_NAMES)}"
        )
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    try:
        return _ALIASES[key]
    except KeyError:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)} "
            f"(aliases: fashion_mnist, fmnist, breast_cancer)"
        ) from None


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split


# --------------------------------------------------------------------------- public loader


def default_data_dir() -> Path:
    """Directory used when no ``data_dir`` is given: ``$INSITU_DATA_DIR`` or ``~/.insitu/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".insitu" / "data"


def load_dataset(
    name: str, split: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> TensorDataset:
    """Load a built-in dataset split as a :class:`TensorDataset`.

    ``name`` is case-insensitive (aliases ``fashion_mnist``/``fmnist`` accepted);
    ``split`` is ``"train"`` or ``"test"``. ``data_dir`` only matters for the IDX datasets
    (MNIST, Fashion-MNIST); it defaults to ``$INSITU_DATA_DIR`` or ``~/.insitu/data``.
    """
    canonical = _canonical_name(name)
    _check_split(split)
    if canonical in ("digits", "breast-cancer"):
        return _load_embedded(canonical, split)
    return _load_idx_dataset(canonical, split, data_dir)


# --------------------------------------------------------------------------- embedded (sklearn)

#: Fixed seed for the embedded datasets' train/test split. Deliberately independent of
#: any run seed so the test set is the same for every experiment.
_EMBEDDED_SPLIT_SEED = 20_170_417
_EMBEDDED_TEST_FRACTION = 0.2


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, put round(test_fraction * class size) random samples in the test set.

    Implemented with numpy (not sklearn) so the split cannot change with the sklearn
    version. Returns sorted (train_idx, test_idx).
    """
    rng = np.random.default_rng(seed)
    test_parts = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(np.floor(len(idx) * test_fraction + 0.5))
        test_parts.append(idx[:n_test])
    test_idx = np.sort(np.concatenate(test_parts)).astype(np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[test_idx] = False
    train_idx = np.flatnonzero(mask).astype(np.int64)
    return train_idx, test_idx


@functools.lru_cache(maxsize=4)
def _embedded_arrays(name: str) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Preprocessed (x, y, num_classes) per split; arrays are read-only (cached)."""
    from sklearn import datasets as skd  # lazy: sklearn import is slow

    if name == "digits":
        bunch = skd.load_digits()
        x = bunch.data.astype(np.float32) / np.float32(16.0)  # pixels are 0..16
    elif name == "breast-cancer":
        bunch = skd.load_breast_cancer()
        x = bunch.data.astype(np.float64)
    else:  # pragma: no cover - guarded by _canonical_name
        raise UnknownDatasetError(name)
    y = bunch.target.astype(np.int64)
    num_classes = int(y.max()) + 1
    train_idx, test_idx = _stratified_split(y, _EMBEDDED_TEST_FRACTION, _EMBEDDED_SPLIT_SEED)
    if name == "breast-cancer":
        # Standardize with train statistics only, so no test information leaks.
        mean = x[train_idx].mean(axis=0)
        std = x[train_idx].std(axis=0)
        std[std == 0] = 1.0
        x = ((x - mean) / std).astype(np.float32)
    out = {}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        xs, ys = np.ascontiguousarray(x[idx]), y[idx]
        xs.flags.writeable = False
        ys.flags.writeable = False
        out[split] = (xs, ys, num_classes)
    return out


def _load_embedded(name: str, split: str) -> TensorDataset:
    x, y, num_classes = _embedded_arrays(name)[split]
    # Copy out of the cache so callers may mutate their tensors freely.
    return TensorDataset(
        x=torch.from_numpy(x.copy()),
        y=torch.from_numpy(y.copy()),
        num_classes=num_classes,
        name=name,
    )


# --------------------------------------------------------------------------- IDX datasets

_IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_SUBDIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
_IDX_NORM = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
_IDX_NUM_CLASSES = 10

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UBYTE = 0x08
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


def _idx_candidate_dirs(name: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return [root, root / name, root / _IDX_SUBDIR[name] / "raw"]


def _find_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _locate_idx(name: str, split: str, data_dir: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    dirs = _idx_candidate_dirs(name, data_dir)
    stems = _IDX_FILES[split]
    for d in dirs:
        found = [_find_file(d, s) for s in stems]
        if all(f is not None for f in found):
            return found[0], found[1]  # type: ignore[return-value]
    raise DatasetNotFoundError(_not_found_message(name, split, dirs))


def _not_found_message(name: str, split: str, dirs: list[Path]) -> str:
    stems = _IDX_FILES[split]
    searched = "\n".join(f"  - {d}" for d in dirs)
    expected = "\n".join(f"  - {s}  (or {s}.gz)" for s in stems)
    url = _IDX_URLS[name]
    return (
        f"{name} ({split} split) not found. Looked in:\n{searched}\n"
        f"for the files:\n{expected}\n"
        f"To obtain them, download the four .gz files from {url} "
        f"(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        f"t10k-labels-idx1-ubyte.gz) into one of those directories, or call "
        f"insitu.data.download_idx({name!r}, DATA_DIR). Point insitu at another directory "
        f"with --data-dir DIR (or the {DATA_DIR_ENV} environment variable)."
    )


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently decompressing gzip (detected by magic bytes, not suffix)."""
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc
    return raw


def _parse_idx(data: bytes, path: Path, expected_magic: int, expected_ndim: int) -> np.ndarray:
    """Validate and parse an unsigned-byte IDX payload into a uint8 array."""
    kind = "images" if expected_magic == _IDX_IMAGES_MAGIC else "labels"
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(data)} bytes, header needs 4)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        zero, dtype, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
        if zero != 0:
            what = "not an IDX file (first two bytes must be zero)"
        elif dtype != _IDX_UBYTE:
            what = f"unsupported IDX element type 0x{dtype:02x} (expected unsigned byte 0x08)"
        else:
            what = f"IDX file has {ndim} dimensions, expected {expected_ndim}"
        raise ValueError(
            f"{path}: bad magic number 0x{magic:08x} for an IDX {kind} file "
            f"(expected 0x{expected_magic:08x}): {what}"
        )
    header_len = 4 + 4 * expected_ndim
    if len(data) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header ({len(data)} bytes, need {header_len} for "
            f"{expected_ndim} dimension sizes)"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=expected_ndim, offset=4))
    if expected_ndim > 1 and any(d == 0 for d in dims[1:]):
        raise ValueError(f"{path}: invalid IDX dimensions {dims} (sample dimensions must be > 0)")
    expected_len = int(np.prod(dims, dtype=np.int64))
    payload_len = len(data) - header_len
    if payload_len != expected_len:
        problem = "truncated" if payload_len < expected_len else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX payload {problem}: dimensions {dims} need {expected_len} bytes, "
            f"found {payload_len}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path_str: str, mtime_ns: int, size: int, magic: int, ndim: int) -> np.ndarray:
    # mtime/size are part of the key so a replaced file is re-read.
    path = Path(path_str)
    arr = _parse_idx(_read_bytes(path), path, magic, ndim)
    arr.flags.writeable = False  # frombuffer over bytes is already read-only; be explicit
    return arr


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    st = path.stat()
    return _read_idx_cached(str(path.resolve()), st.st_mtime_ns, st.st_size, magic, ndim)


def _load_idx_dataset(name: str, split: str, data_dir: str | os.PathLike[str] | None) -> TensorDataset:
    images_path, labels_path = _locate_idx(name, split, data_dir)
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels; the files must come from the same split"
        )
    if labels.size and int(labels.max()) >= _IDX_NUM_CLASSES:
        raise ValueError(
            f"{labels_path}: label {int(labels.max())} out of range for {name} "
            f"({_IDX_NUM_CLASSES} classes)"
        )
    mean, std = _IDX_NORM[name]
    x = images.astype(np.float32)  # fresh, writable copy; cache stays untouched
    x *= np.float32(1.0 / 255.0)
    x -= np.float32(mean)
    x /= np.float32(std)
    n, rows, cols = images.shape
    return TensorDataset(
        x=torch.from_numpy(x.reshape(n, 1, rows, cols)),
        y=torch.from_numpy(labels.astype(np.int64)),
        num_classes=_IDX_NUM_CLASSES,
        name=name,
    )


def download_idx(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, timeout: float = 60.0
) -> Path:
    """Download the four IDX .gz files of ``mnist``/``fashion-mnist`` with urllib.

    Files go to ``data_dir/<name>`` (where :func:`load_dataset` looks); files already
    present are kept. Returns that directory. Meant for users: nothing in insitu calls
    this implicitly.
    """
    canonical = _canonical_name(name)
    if canonical not in _IDX_URLS:
        raise UnknownDatasetError(
            f"{canonical!r} needs no download; downloadable datasets: {', '.join(_IDX_URLS)}"
        )
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    target = root / canonical
    target.mkdir(parents=True, exist_ok=True)
    base = _IDX_URLS[canonical]
    for stems in _IDX_FILES.values():
        for stem in stems:
            if _find_file(target, stem) is not None:
                continue
            fname = f"{stem}.gz"
            url = base + fname
            fd, tmp = tempfile.mkstemp(prefix=f".{fname}.", dir=target)
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                    shutil.copyfileobj(resp, out)
                os.replace(tmp, target / fname)
            except BaseException as exc:
                Path(tmp).unlink(missing_ok=True)
                if isinstance(exc, OSError):
                    raise OSError(f"downloading {url} failed: {exc}") from exc
                raise
    return target
