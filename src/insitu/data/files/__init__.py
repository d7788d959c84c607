"""Bring your own data: image folders, CSV/Parquet tables, NumPy ``.npz`` and Hugging Face ``save_to_disk`` folders.

:func:`load_data` reads a path into :class:`LoadedData` (train and test :class:`~insitu.data.TensorDataset`, the
class names, and, with ``partition_by``, the natural group of every row). Every reader returns the same
:class:`Raw` record (unnormalized float32 inputs, raw labels, optional groups and test flags); this module turns
it into tensors the same way for every format: classes (sorted names, or the given list), the test split
(explicit, else a seeded stratified held-out fraction) and normalization (statistics of the training rows, or
given). docs/data.md describes the layouts, the flags and the errors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from insitu.data.datasets import TensorDataset
from insitu.data.files.raw import Raw, classes_of, labels_to_indices, stratified_test_mask

__all__ = ["DATA_FORMATS", "IMAGE_MODES", "DataSpec", "LoadedData", "Raw", "infer_format", "load_data"]

log = logging.getLogger(__name__)

DATA_FORMATS: tuple[str, ...] = ("imagefolder", "csv", "parquet", "npz", "hf")
IMAGE_MODES: tuple[str, ...] = ("", "grayscale", "rgb")
ROLES = ("split", "train", "test")


@dataclass(frozen=True)
class DataSpec:
    """How to read one path: the format ("" = inferred), which columns mean what, and the image options.

    ``classes`` fixes the class order (else: sorted names; integer labels 0..K-1 keep their value);
    ``normalize`` is "auto" (mean/std of the training rows, per channel for images, per feature for tables),
    "none", or "MEAN[,MEAN...]/STD[,STD...]" (the same on every party of a deployment).
    """

    format: str = ""
    label_column: str = "label"
    feature_columns: tuple[str, ...] = ()
    exclude_columns: tuple[str, ...] = ()
    partition_by: str = ""
    classes: tuple[str, ...] = ()
    num_classes: int | None = None
    image_size: tuple[int, int] | None = None
    image_mode: str = ""
    normalize: str = "auto"
    x_key: str = "x"
    y_key: str = "y"
    test_data: str = ""
    test_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.format and self.format not in DATA_FORMATS:
            raise ValueError(f"unknown data format {self.format!r}; choose one of {', '.join(DATA_FORMATS)} "
                             "(or leave it empty to infer it from the path)")
        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"unknown image mode {self.image_mode!r}; choose grayscale or rgb (or leave it empty: "
                             "grayscale when every image is, else rgb)")
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes lists a name twice: {', '.join(self.classes)}")
        parse_normalize(self.normalize)

    @classmethod
    def from_settings(cls, settings: Any) -> DataSpec:
        """A spec from the string settings of ``insitu simulate`` / ``insitu client`` (comma lists, "64x48")."""
        def text(name: str, default: str = "") -> str:
            value = getattr(settings, name, default)
            return "" if value is None else str(value)

        return cls(format=text("data_format"), label_column=text("label_column", "label") or "label",
                   feature_columns=split_list(text("feature_columns")),
                   exclude_columns=split_list(text("exclude_columns")), partition_by=text("partition_by"),
                   classes=split_list(text("classes")), num_classes=getattr(settings, "num_classes", None),
                   image_size=parse_image_size(text("image_size")), image_mode=text("image_mode"),
                   normalize=text("normalize", "auto") or "auto", x_key=text("x_key", "x") or "x",
                   y_key=text("y_key", "y") or "y", test_data=text("test_data"),
                   test_fraction=float(getattr(settings, "test_fraction", 0.2)),
                   split_seed=int(getattr(settings, "split_seed", 0)))


@dataclass
class LoadedData:
    """What :func:`load_data` read: the datasets, the class names and the natural groups (if any).

    ``train_groups``/``test_groups`` hold each row's group index into ``group_names`` (sorted group values);
    ``skipped`` lists the files that could not be read (also logged once).
    """

    train: TensorDataset
    test: TensorDataset
    classes: tuple[str, ...]
    group_names: tuple[str, ...] = ()
    train_groups: np.ndarray | None = None
    test_groups: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)
    format: str = ""

    def group_parts(self, test: bool = False) -> list[np.ndarray]:
        """One sorted index array per group (client i holds group ``group_names[i]``)."""
        groups = self.test_groups if test else self.train_groups
        if groups is None:
            raise ValueError("this data has no groups: pass partition_by (--partition-by COLUMN)")
        return [np.flatnonzero(groups == g).astype(np.int64) for g in range(len(self.group_names))]

    def describe(self) -> dict[str, Any]:
        """What a run records (data.json): format, classes and, with groups, client index -> group value."""
        info: dict[str, Any] = {"format": self.format, "classes": list(self.classes),
                                "input_shape": list(self.train.input_shape), "train_examples": len(self.train),
                                "test_examples": len(self.test)}
        if self.group_names:
            groups = self.train_groups if self.train_groups is not None else np.zeros(0, dtype=np.int64)
            sizes = np.bincount(groups, minlength=len(self.group_names))
            info["clients"] = {str(i): {"group": name, "train_examples": int(sizes[i])}
                               for i, name in enumerate(self.group_names)}
        if self.skipped:
            info["skipped"] = list(self.skipped)
        return info


def split_list(text: str) -> tuple[str, ...]:
    """"a, b,c" -> ("a", "b", "c"); "" -> ()."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_image_size(text: str) -> tuple[int, int] | None:
    """"64" -> (64, 64); "64x48" -> (height 64, width 48); "" -> None (keep the images' size)."""
    text = text.strip().lower()
    if not text:
        return None
    parts = text.split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2) or min(dims) < 1:
        raise ValueError(f"image size {text!r} is not a size: give one number (64: 64x64) or HEIGHTxWIDTH (64x48)")
    return (dims[0], dims[-1])


def parse_normalize(text: str) -> tuple[np.ndarray, np.ndarray] | str:
    """"auto" / "none", or (mean, std) arrays from "0.5,0.4/0.2,0.3" (one value per channel or feature)."""
    text = text.strip().lower()
    if text in ("auto", "none"):
        return text
    problem = (f"normalize {text!r} is not auto, none or MEAN/STD: give per-channel lists such as "
               "0.485,0.456,0.406/0.229,0.224,0.225 (or one mean/std for every channel)")
    if text.count("/") != 1:
        raise ValueError(problem)
    try:
        with np.errstate(over="ignore"):  # 1e39 -> inf, refused below
            mean, std = (np.asarray([float(v) for v in side.split(",")], dtype=np.float32) for side in text.split("/"))
    except ValueError:
        raise ValueError(problem) from None
    if mean.shape != std.shape or not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise ValueError(problem + " with as many stds as means, every value a finite float32 and each std > 0")
    return mean, std


def infer_format(path: Path) -> str:
    """The format a path's suffix or folder layout implies; an error says what to pass when it cannot tell."""
    suffix = path.suffix.lower()
    if path.is_file():
        by_suffix = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}
        if suffix in by_suffix:
            return by_suffix[suffix]
        raise ValueError(f"cannot tell the format of {path} from its suffix {suffix!r}: pass --data-format "
                         f"({', '.join(DATA_FORMATS)})")
    if path.is_dir():
        if any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
            return "hf"
        return "imagefolder"
    raise FileNotFoundError(f"no file or folder at {path}: --data takes a folder of images (one subfolder per "
                            "class), a .csv, .parquet or .npz file, or a Hugging Face save_to_disk folder")


def read_raw(path: Path, spec: DataSpec) -> Raw:
    """Read ``path`` with the reader of its format (inferred when ``spec.format`` is empty)."""
    kind = spec.format or infer_format(path)
    if not path.exists():
        raise FileNotFoundError(f"no file or folder at {path}")
    if kind == "imagefolder":
        from insitu.data.files.images import read_image_folder

        return read_image_folder(path, spec)
    if kind in ("csv", "parquet"):
        from insitu.data.files.tables import read_table

        return read_table(path, spec, kind)
    if kind == "npz":
        from insitu.data.files.arrays import read_npz

        return read_npz(path, spec)
    from insitu.data.files.hf import read_hf

    return read_hf(path, spec)


def load_data(path: str | Path, spec: DataSpec | None = None, role: str = "split") -> LoadedData:
    """Read one path of the user's own data into train and test datasets.

    ``role`` says what the path is for: "split" (a simulation: train and test, the test rows from an explicit
    split, else a stratified ``test_fraction`` held out with ``split_seed``), "train" (a deployed client: all of
    it trains, an explicit test split becomes its local test set) or "test" (a server: its explicit test split,
    else all of it, is what it evaluates on).
    """
    spec = spec or DataSpec()
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    path = Path(path).expanduser()
    fmt = spec.format or infer_format(path)
    raw = read_raw(path, spec)
    if spec.test_data:
        test_raw = read_raw(Path(spec.test_data).expanduser(), spec)
        raw = raw.concat(test_raw)
    is_test = raw.is_test
    if is_test is None:
        if role == "split" and spec.test_fraction > 0:
            is_test = stratified_test_mask(raw.labels, spec.test_fraction, spec.split_seed)
        else:
            is_test = np.zeros(len(raw.labels), dtype=bool) if role != "test" else np.ones(len(raw.labels), bool)
    elif role == "test" and not is_test.any():
        is_test = np.ones(len(raw.labels), dtype=bool)
    classes = classes_of(raw, spec)
    y = labels_to_indices(raw.labels, classes, raw.source)
    x = raw.x
    train_rows, test_rows = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    if role == "split" and len(train_rows) == 0:
        raise ValueError(f"{raw.source}: every row is in the test split, none is left to train on")
    x = normalized(x, train_rows if len(train_rows) else test_rows, spec.normalize, raw.source)
    name = path.stem or path.name
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)

    def part(rows: np.ndarray) -> TensorDataset:
        idx = torch.from_numpy(rows.astype(np.int64))
        return TensorDataset(xt.index_select(0, idx), yt.index_select(0, idx), len(classes), name)

    loaded = LoadedData(part(train_rows), part(test_rows), classes, skipped=list(raw.skipped), format=fmt)
    if spec.partition_by:
        if raw.groups is None:
            raise ValueError(f"{raw.source} has no groups for partition_by {spec.partition_by!r}")  # reader checks
        names, codes = group_codes(raw.groups)
        loaded.group_names = names
        loaded.train_groups, loaded.test_groups = codes[train_rows], codes[test_rows]
    return loaded


def group_codes(groups: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """The sorted group values (numerically when every value is a number: 2 before 10) and each row's index
    into them."""
    names, codes = np.unique(groups.astype(str), return_inverse=True)
    try:
        order = np.argsort([float(n) for n in names], kind="stable")
    except ValueError:
        order = np.arange(len(names))
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = np.arange(len(names))
    return tuple(str(names[i]) for i in order), rank[codes.reshape(-1)]


def normalized(x: np.ndarray, rows: np.ndarray, how: str, source: str) -> np.ndarray:
    """``x`` standardized in place: per channel (axis 1 of images) or per feature, by ``rows``' statistics or the
    given mean/std."""
    rule = parse_normalize(how)
    if rule == "none" or len(x) == 0:
        return x
    channels = x.shape[1] if x.ndim > 1 else 1
    if isinstance(rule, tuple):
        mean, std = rule
        if mean.size not in (1, channels):
            raise ValueError(f"{source}: normalize gives {mean.size} means but the data has {channels} "
                             f"{'channels' if x.ndim > 2 else 'features'}: give one value or {channels}")
    else:
        axes = (0, *range(2, x.ndim))
        sample = x[rows]
        mean = sample.mean(axis=axes, dtype=np.float64).astype(np.float32)
        std = sample.std(axis=axes, dtype=np.float64).astype(np.float32)
        std[~(std > 1e-12)] = 1.0  # a constant channel or feature stays constant (0) instead of dividing by 0
    shape = (1, -1) + (1,) * (x.ndim - 2) if x.ndim > 1 else (-1,)
    x -= np.broadcast_to(mean, (channels,)).reshape(shape) if mean.size == 1 else mean.reshape(shape)
    x /= np.broadcast_to(std, (channels,)).reshape(shape) if std.size == 1 else std.reshape(shape)
    return x
