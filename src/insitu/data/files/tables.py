"""CSV and Parquet tables: a label column, numeric feature columns, optional group and ``split`` columns."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu.data.files.raw import MissingDependencyError, Raw

if TYPE_CHECKING:
    from insitu.data.files import DataSpec

SPLIT_COLUMN = "split"
SPLIT_VALUES = frozenset({"train", "test"})
MISSING_TEXT = frozenset({"", "na", "nan", "null", "none"})
SHOWN = 5

Columns = dict[str, np.ndarray]
"""A table by column: float64 (NaN = missing) for numeric columns, else object arrays of str (None = missing)."""


def read_table(path: Path, spec: DataSpec, kind: str) -> Raw:
    """A CSV (stdlib reader; .tsv is tab-separated) or Parquet (pyarrow) file as a :class:`Raw`."""
    columns = read_parquet(path) if kind == "parquet" else read_csv_columns(path)
    return columns_to_raw(columns, spec, str(path))


def read_csv_columns(path: Path) -> Columns:
    """Every column of a header-row CSV; a column whose every present value is a number becomes float64."""
    if not path.is_file():
        raise FileNotFoundError(f"no CSV file at {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        try:
            header = next(reader, None)
            if not header:
                raise ValueError(f"{path} is empty; expected a header row then one row per example")
            if len(set(header)) != len(header):
                twice = sorted({h for h in header if header.count(h) > 1})
                raise ValueError(f"{path}: column name(s) {', '.join(twice)} appear more than once in the header")
            rows = []
            for line_no, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{path}:{line_no}: {len(row)} values, the header has {len(header)}")
                rows.append(row)
        except csv.Error as error:  # a field over csv.field_size_limit(), a NUL byte: a user's file, not a bug
            raise ValueError(f"{path}:{reader.line_num}: not readable as CSV ({error}); is it a CSV file?") from None
    if not rows:
        raise ValueError(f"{path} has a header but no examples")
    return {name: _typed([row[i] for row in rows]) for i, name in enumerate(header)}


def _typed(values: list[str]) -> np.ndarray:
    """float64 with NaN for missing cells when every present cell is a number, else str objects (None missing)."""
    present = [None if v.strip().lower() in MISSING_TEXT else v.strip() for v in values]
    try:
        return np.asarray([np.nan if v is None else float(v) for v in present], dtype=np.float64)
    except ValueError:
        return np.asarray(present, dtype=object)


def read_parquet(path: Path) -> Columns:
    """Every column of a Parquet file (numeric and boolean types as float64, others as str objects)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("reading Parquet needs pyarrow: pip install 'insitu[data]'") from None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise ValueError(f"{path} is not a readable Parquet file: {error}") from None
    return arrow_columns(table, str(path))


def arrow_columns(table: Any, source: str) -> Columns:
    """A pyarrow Table's columns in the :data:`Columns` form (nested types are refused by name; integers a float64
    cannot hold exactly become text, so an excluded ID column does not stop the read)."""
    import pyarrow as pa

    out: Columns = {}
    for name, column in zip(table.column_names, table.columns):
        kind = column.type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            try:
                out[name] = column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
            except pa.ArrowInvalid:  # integers beyond 2**53 (IDs): exact as text, refused by name if used as features
                out[name] = np.asarray([None if v is None else str(v) for v in column.to_pylist()], dtype=object)
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind):
            out[name] = np.asarray([None if v is None else str(v) for v in column.to_pylist()], dtype=object)
        else:
            out[name] = np.asarray([None if v is None else repr(v)[:40] for v in column.to_pylist()], dtype=object)
    if not out or table.num_rows == 0:
        raise ValueError(f"{source} holds no examples")
    return out


def _missing(column: np.ndarray) -> np.ndarray:
    if column.dtype == object:
        return np.asarray([v is None for v in column], dtype=bool)
    return np.isnan(column)


def _need(columns: Columns, name: str, what: str, flag: str, source: str) -> np.ndarray:
    if name not in columns:
        raise ValueError(f"{source} has no column {name!r} for the {what} (columns: {', '.join(columns)}): "
                         f"pass {flag} with one of those")
    column = columns[name]
    missing = _missing(column)
    if missing.any():
        raise ValueError(f"{source}: the {what} column {name!r} has {int(missing.sum())} missing value(s) (rows "
                         f"{_rows(missing)}): fill them in or drop those rows")
    return column


def _rows(mask: np.ndarray) -> str:
    """Data-row numbers (1 = the first row after the header) of a mask, the first few."""
    rows = (np.flatnonzero(mask) + 1).tolist()
    return ", ".join(map(str, rows[:SHOWN])) + (", ..." if len(rows) > SHOWN else "")


def columns_to_raw(columns: Columns, spec: DataSpec, source: str) -> Raw:
    """Pick the label, group, split and feature columns; refuse non-numeric features and missing values by name."""
    label = _need(columns, spec.label_column, "label", "--label-column", source)
    groups = None
    if spec.partition_by:
        groups = _need(columns, spec.partition_by, "partition", "--partition-by", source)
        groups = np.asarray([_cell_text(v) for v in groups], dtype=str)
    is_test = None
    split = columns.get(SPLIT_COLUMN)
    used = {spec.label_column, spec.partition_by}
    if split is not None and split.dtype == object and set(split.tolist()) <= SPLIT_VALUES:
        is_test = np.asarray([v == "test" for v in split], dtype=bool)
        used.add(SPLIT_COLUMN)
    for name in (*spec.feature_columns, *spec.exclude_columns):
        if name not in columns:
            raise ValueError(f"{source} has no column {name!r} (columns: {', '.join(columns)}): fix "
                             "--feature-columns / --exclude-columns")
    features = list(spec.feature_columns) or [c for c in columns if c not in used and c not in spec.exclude_columns]
    if not features:
        raise ValueError(f"{source} has no feature columns besides {', '.join(sorted(c for c in used if c))}")
    textual = [c for c in features if columns[c].dtype == object]
    if textual:
        example = next(v for v in columns[textual[0]] if v is not None)
        raise ValueError(f"{source}: column(s) {', '.join(textual)} are not numeric (e.g. {textual[0]} = "
                         f"{example!r}): exclude them with --exclude-columns {','.join(textual)}, list the features "
                         "with --feature-columns, or encode them as numbers")
    gaps = [(c, _missing(columns[c])) for c in features]
    gaps = [(c, m) for c, m in gaps if m.any()]
    if gaps:
        detail = "; ".join(f"{c!r}: {int(m.sum())} row(s) ({_rows(m)})" for c, m in gaps)
        raise ValueError(f"{source}: missing values in feature column(s) {detail}: fill them in (e.g. with the "
                         f"column mean), drop those rows, or exclude the column(s) with --exclude-columns")
    with np.errstate(over="ignore"):  # 1e39 -> inf, refused by name below
        x = np.stack([columns[c] for c in features], axis=1).astype(np.float32)
    refuse_non_finite(x, features, source)
    return Raw(x, _labels(label), source, groups=groups, is_test=is_test)


def refuse_non_finite(x: np.ndarray, names: list[str], source: str) -> None:
    """Raise a ValueError naming the feature column(s) of ``x`` (N x len(names), or any N x ... for one name) that
    hold inf, NaN or a value beyond float32's range (1e39 becomes inf), with the row count and the first rows."""
    if x.size == 0:
        return
    bad = ~np.isfinite(x.reshape(len(x), len(names), -1))
    if not bad.any():
        return
    columns = [name for name, hit in zip(names, bad.any(axis=(0, 2))) if hit]
    rows = bad.any(axis=(1, 2))
    raise ValueError(f"{source}: feature column(s) {', '.join(map(repr, columns))} hold infinite values, NaN or numbers "
                     f"beyond float32's range (about 3.4e38) in {int(rows.sum())} row(s) ({_rows(rows)}): fix or drop "
                     "those rows, or exclude the column(s) with --exclude-columns")


def _cell_text(value: Any) -> str:
    """A group value as text: 3.0 -> "3", "north" -> "north"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _labels(column: np.ndarray) -> np.ndarray:
    """Integer labels when every value is a whole number, else the values as names."""
    if column.dtype != object and np.all(np.mod(column, 1) == 0):
        return column.astype(np.int64)
    return np.asarray([_cell_text(v) for v in column], dtype=str)
