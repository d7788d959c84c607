"""Hugging Face ``datasets`` saved with ``save_to_disk``, read with pyarrow alone (no ``datasets`` import).

A saved ``Dataset`` is a folder of Arrow stream files listed in ``state.json`` beside ``dataset_info.json`` (the
features: ``ClassLabel`` names, ``Image`` columns); a ``DatasetDict`` is a ``dataset_dict.json`` listing split
folders. Image columns hold ``{"bytes", "path"}`` structs and decode with Pillow; other datasets are tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu.data.files.raw import MissingDependencyError, Raw
from insitu.data.files.tables import arrow_columns, columns_to_raw, refuse_non_finite

if TYPE_CHECKING:
    from insitu.data.files import DataSpec

TRAIN_SPLIT, TEST_SPLIT = "train", "test"


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON file of a saved Hugging Face dataset: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")  # noqa: TRY004 (a user's bad file)
    return data


def read_hf(root: Path, spec: DataSpec) -> Raw:
    """A saved Dataset, or a DatasetDict whose "train" split trains and whose "test" split (if any) tests."""
    if (root / "dataset_dict.json").is_file():
        splits = _json(root / "dataset_dict.json").get("splits", [])
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise ValueError(f"{root / 'dataset_dict.json'}: \"splits\" must be a list of split names")
        if TRAIN_SPLIT not in splits:
            raise ValueError(f"{root} is a DatasetDict without a {TRAIN_SPLIT!r} split (splits: {', '.join(splits)}): "
                             f"point --data at one split's folder, e.g. {root}/{splits[0] if splits else 'NAME'}")
        raw = _read_split(root / TRAIN_SPLIT, spec)
        if TEST_SPLIT in splits:
            raw = raw.concat(_read_split(root / TEST_SPLIT, spec))
            raw.source = str(root)
        return raw
    return _read_split(root, spec)


def _read_split(folder: Path, spec: DataSpec) -> Raw:
    try:
        import pyarrow as pa
    except ImportError:
        raise MissingDependencyError("reading a Hugging Face dataset folder needs pyarrow: pip install 'insitu[data]'") from None
    state, info = folder / "state.json", folder / "dataset_info.json"
    if not state.is_file():
        raise ValueError(f"{folder} has no state.json: it is not a folder written by Dataset.save_to_disk")
    entries = _json(state).get("_data_files", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("filename"), str)
                                                for e in entries):
        raise ValueError(f"{state}: _data_files must be a list of objects with a \"filename\" string, as "
                         "Dataset.save_to_disk writes it")
    files = [entry["filename"] for entry in entries]
    if not files:
        raise ValueError(f"{state} lists no data files")
    tables = []
    for name in files:
        if Path(name).name != name:  # a file name, never a path out of the folder
            raise ValueError(f"{state}: data file {name!r} is not a plain file name")
        try:
            with pa.memory_map(str(folder / name)) as source:
                part = pa.ipc.open_stream(source).read_all()
                part.validate(full=True)  # offsets, UTF-8, dictionary indices: a crafted file is refused, not read
            tables.append(part)
        except (OSError, pa.ArrowException) as error:
            raise ValueError(f"{folder / name} is not a readable, valid Arrow file: {error}") from None
    table = pa.concat_tables(tables)
    features = _json(info).get("features", {}) if info.is_file() else {}
    if not isinstance(features, dict):
        features = {}
    images = [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]
    names = _class_names(features.get(spec.label_column))
    if images:
        raw = _image_split(table, images[0] if spec.x_key not in images else spec.x_key, folder, spec)
    elif spec.x_key in table.column_names:  # an array column (list of numbers per row)
        labels = _label_column(table, spec, folder)
        try:
            with np.errstate(over="ignore"):  # 1e39 -> inf, refused by name below
                x = np.asarray(table.column(spec.x_key).to_pylist(), dtype=np.float32)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{folder}: column {spec.x_key!r} must hold a list of numbers of the same length in every "
                             f"row (no missing values): {error}") from None
        refuse_non_finite(x, [spec.x_key], str(folder))
        raw = Raw(x, labels, str(folder), groups=_groups(table, spec, folder))
    else:
        drop = [n for n in table.column_names if n in images]
        raw = columns_to_raw(arrow_columns(table.drop_columns(drop), str(folder)), spec, str(folder))
    if names is not None:
        raw.labels = _named(raw.labels, names, folder)
        raw.classes = tuple(names)
    return raw


def _class_names(feature: Any) -> list[str] | None:
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return [str(n) for n in feature["names"]]
    return None


def _named(labels: np.ndarray, names: list[str], folder: Path) -> np.ndarray:
    """ClassLabel indices as their names (so classes match by name across parties)."""
    idx = labels.astype(np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= len(names)):
        raise ValueError(f"{folder}: label {int(idx.min()) if idx.min() < 0 else int(idx.max())} is not one of the "
                         f"{len(names)} ClassLabel names (-1 marks an unlabelled example, which cannot train)")
    return np.asarray(names, dtype=str)[idx]


def _label_column(table: Any, spec: DataSpec, folder: Path) -> np.ndarray:
    if spec.label_column not in table.column_names:
        raise ValueError(f"{folder} has no column {spec.label_column!r} for the label (columns: "
                         f"{', '.join(table.column_names)}): pass --label-column")
    values = table.column(spec.label_column).to_pylist()
    if any(v is None for v in values):
        raise ValueError(f"{folder}: the label column {spec.label_column!r} has "
                         f"{sum(v is None for v in values)} missing value(s)")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64)
    return np.asarray([str(v) for v in values], dtype=str)


def _groups(table: Any, spec: DataSpec, folder: Path) -> np.ndarray | None:
    if not spec.partition_by:
        return None
    if spec.partition_by not in table.column_names:
        raise ValueError(f"{folder} has no column {spec.partition_by!r} for the partition (columns: "
                         f"{', '.join(table.column_names)}): pass --partition-by with one of those")
    return np.asarray([str(v) for v in table.column(spec.partition_by).to_pylist()], dtype=str)


def _image_split(table: Any, column: str, folder: Path, spec: DataSpec) -> Raw:
    from insitu.data.files.images import decode_images

    labels = _label_column(table, spec, folder)
    groups = _groups(table, spec, folder)
    items: list[tuple[str, Path | bytes]] = []
    for row, cell in enumerate(table.column(column).to_pylist()):
        data = cell.get("bytes") if isinstance(cell, dict) else None
        path = cell.get("path") if isinstance(cell, dict) else None
        name = f"row {row}" + (f" ({path})" if path else "")
        items.append((name, data if data is not None else b""))  # no embedded bytes: counted as unreadable
    x, ok, skipped = decode_images(items, spec, str(folder))
    keep = np.flatnonzero(ok)
    return Raw(x, labels[keep], str(folder), groups=None if groups is None else groups[keep], skipped=skipped)
