"""Partitioners: split a dataset's sample indices among federated clients.

Every partitioner returns ``list[np.ndarray]`` — one sorted int64 index array per client —
whose arrays are disjoint and together cover every sample exactly once. All randomness
comes from ``np.random.default_rng(seed)``, so the same arguments always give the same
partition. Arguments are validated before any work, and a violated limit raises
:class:`PartitionError` saying which limit broke and how to fix it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "PARTITION_NAMES",
    "PartitionError",
    "dirichlet",
    "format_histogram",
    "iid",
    "label_histogram",
    "partition",
    "quantity_skew",
    "shards",
    "skew_score",
]

PARTITION_NAMES: tuple[str, ...] = ("iid", "dirichlet", "shards", "quantity")

LabelsLike = np.ndarray | Sequence[int]
Partitions = Sequence[np.ndarray]


class PartitionError(ValueError):
    """Raised when a partition request is impossible or its arguments are invalid."""


# --------------------------------------------------------------------------- validation


def _as_labels(labels: LabelsLike) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise PartitionError(f"labels must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise PartitionError(f"labels must be integers, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise PartitionError(f"labels must be non-negative, found {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PartitionError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _check_clients(num_samples: int, num_clients: object) -> int:
    num_samples = _check_int(num_samples, "num_samples")
    if num_samples < 0:
        raise PartitionError(f"num_samples must be >= 0, got {num_samples}")
    k = _check_int(num_clients, "num_clients")
    if k < 1:
        raise PartitionError(f"num_clients must be >= 1, got {k}; use at least one client")
    if k > num_samples:
        raise PartitionError(
            f"more clients ({k}) than samples ({num_samples}): some clients would be empty; "
            f"use at most {num_samples} clients or a larger dataset"
        )
    return k


def _rng(seed: object) -> np.random.Generator:
    """The only source of randomness; a missing/invalid seed would break determinism."""
    sd = _check_int(seed, "seed")
    if sd < 0:
        raise PartitionError(f"seed must be >= 0, got {sd}")
    return np.random.default_rng(sd)


def _check_alpha(alpha: object) -> float:
    try:
        a = float(alpha)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PartitionError(f"alpha must be a positive number, got {alpha!r}") from None
    if not math.isfinite(a) or a <= 0:
        raise PartitionError(
            f"alpha must be a finite number > 0, got {alpha!r}; small alpha (e.g. 0.1) gives "
            f"strong skew, large alpha (e.g. 100) is close to IID"
        )
    return a


def _check_min_size(min_size: object, num_samples: int, num_clients: int) -> int:
    m = _check_int(min_size, "min_size")
    if m < 0:
        raise PartitionError(f"min_size must be >= 0, got {m}")
    if m * num_clients > num_samples:
        raise PartitionError(
            f"min_size * num_clients = {m} * {num_clients} = {m * num_clients} exceeds the "
            f"{num_samples} samples available; lower min_size to at most "
            f"{num_samples // num_clients} or use fewer clients"
        )
    return m


def _check_shards(shards_per_client: object, num_samples: int, num_clients: int) -> int:
    s = _check_int(shards_per_client, "shards_per_client")
    if s < 1:
        raise PartitionError(f"shards_per_client must be >= 1, got {s}")
    if num_clients * s > num_samples:
        raise PartitionError(
            f"num_clients * shards_per_client = {num_clients} * {s} = {num_clients * s} shards "
            f"exceeds the {num_samples} samples (each shard needs at least one sample); "
            f"use at most {num_samples // num_clients} shards per client or fewer clients"
        )
    return s


def _finish(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet_proportions(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    """Draw Dir(alpha) proportions over k clients, guarding against degenerate draws."""
    p = rng.dirichlet(np.full(k, alpha))
    if not np.all(np.isfinite(p)) or p.sum() <= 0:  # extreme alpha underflow
        p = np.zeros(k)
        p[rng.integers(k)] = 1.0
    return p / p.sum()


# --------------------------------------------------------------------------- partitioners


def iid(num_samples: int, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle all indices and split them into equal shares (sizes differ by at most 1)."""
    k = _check_clients(num_samples, num_clients)
    rng = _rng(seed)
    perm = rng.permutation(int(num_samples))
    return _finish(np.array_split(perm, k))


def dirichlet(
    labels: LabelsLike,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_retries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among clients with Dir(alpha) proportions.

    The scheme of Hsu et al. (2019) / Yurochkin et al. (2019): lower alpha means each
    client sees fewer classes. Whole draws are repeated until every client has at least
    ``min_size`` samples; after ``max_retries`` failed draws a PartitionError is raised.
    """
    y = _as_labels(labels)
    n = len(y)
    k = _check_clients(n, num_clients)
    a = _check_alpha(alpha)
    m = _check_min_size(min_size, n, k)
    retries = _check_int(max_retries, "max_retries")
    if retries < 1:
        raise PartitionError(f"max_retries must be >= 1, got {retries}")

    rng = _rng(seed)
    class_indices = [np.flatnonzero(y == c) for c in np.unique(y)]
    smallest = n
    for _ in range(retries):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for idx in class_indices:
            idx = rng.permutation(idx)
            p = _dirichlet_proportions(rng, a, k)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        sizes = [sum(len(c) for c in chunks) for chunks in parts]
        smallest = min(sizes)
        if smallest >= m:
            return _finish([np.concatenate(chunks) for chunks in parts])
    raise PartitionError(
        f"dirichlet(alpha={a}) could not give all {k} clients at least min_size={m} samples "
        f"in {retries} attempts (smallest client had {smallest}); raise alpha, use fewer "
        f"clients, lower min_size, or raise max_retries"
    )


def shards(
    labels: LabelsLike, num_clients: int, *, shards_per_client: int = 2, seed: int
) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. (2017).

    Indices are sorted by label (stable), cut into ``num_clients * shards_per_client``
    equal shards, and each client gets ``shards_per_client`` random shards. When the
    sample count is not divisible, the leftover samples (the tail of the sorted order)
    are dealt round-robin to clients 0, 1, ... so nothing is lost.
    """
    y = _as_labels(labels)
    n = len(y)
    k = _check_clients(n, num_clients)
    s = _check_shards(shards_per_client, n, k)

    rng = _rng(seed)
    order = np.argsort(y, kind="stable")
    num_shards = k * s
    shard_size = n // num_shards
    body = order[: num_shards * shard_size].reshape(num_shards, shard_size)
    remainder = order[num_shards * shard_size :]
    assignment = rng.permutation(num_shards).reshape(k, s)
    parts = []
    for client in range(k):
        extra = remainder[client::k]
        parts.append(np.concatenate([body[assignment[client]].reshape(-1), extra]))
    return _finish(parts)


def quantity_skew(
    num_samples: int, num_clients: int, *, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Quantity skew: client sizes follow Dir(alpha) proportions; labels are IID.

    Each client first gets ``min_size`` samples; the rest are shared by the Dirichlet
    proportions (largest-remainder rounding, so sizes sum exactly to ``num_samples``).
    Samples are assigned from one random permutation, so each client's labels are IID.
    """
    k = _check_clients(num_samples, num_clients)
    a = _check_alpha(alpha)
    m = _check_min_size(min_size, int(num_samples), k)
    n = int(num_samples)

    rng = _rng(seed)
    p = _dirichlet_proportions(rng, a, k)
    rest = n - m * k
    raw = p * rest
    extra = np.floor(raw).astype(np.int64)
    short = rest - int(extra.sum())
    if short > 0:
        # Give the leftover units to the largest fractional parts (ties: lower client id).
        frac_order = np.argsort(-(raw - extra), kind="stable")
        extra[frac_order[:short]] += 1
    sizes = extra + m
    perm = rng.permutation(n)
    return _finish(np.split(perm, np.cumsum(sizes)[:-1]))


def partition(
    labels: LabelsLike | int,
    num_clients: int,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Dispatch to the partitioner named by ``scheme`` (one of :data:`PARTITION_NAMES`).

    ``labels`` may be an int (the sample count) for the label-free schemes ``iid`` and
    ``quantity``. Only the parameters the chosen scheme uses are validated.
    """
    key = str(scheme).strip().lower().replace("_", "-")
    key = {"quantity-skew": "quantity", "label-dirichlet": "dirichlet"}.get(key, key)
    if key not in PARTITION_NAMES:
        raise PartitionError(
            f"unknown partition scheme {scheme!r}; choose one of: {', '.join(PARTITION_NAMES)}"
        )
    if isinstance(labels, (int, np.integer)) and not isinstance(labels, bool):
        if key in ("dirichlet", "shards"):
            raise PartitionError(
                f"scheme {key!r} needs the label array, not just a sample count ({labels})"
            )
        n = int(labels)
    else:
        n = len(_as_labels(labels))  # type: ignore[arg-type]

    if key == "iid":
        return iid(n, num_clients, seed=seed)
    if key == "quantity":
        return quantity_skew(n, num_clients, alpha=alpha, seed=seed, min_size=min_size)
    if key == "dirichlet":
        return dirichlet(labels, num_clients, alpha=alpha, seed=seed, min_size=min_size)  # type: ignore[arg-type]
    return shards(labels, num_clients, shards_per_client=shards_per_client, seed=seed)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- diagnostics


def label_histogram(partitions: Partitions, labels: LabelsLike, num_classes: int) -> np.ndarray:
    """Per-client label counts as an int64 array of shape ``(clients, classes)``."""
    y = _as_labels(labels)
    c = _check_int(num_classes, "num_classes")
    if c < 1:
        raise PartitionError(f"num_classes must be >= 1, got {c}")
    if y.size and int(y.max()) >= c:
        raise PartitionError(f"label {int(y.max())} is out of range for num_classes={c}")
    hist = np.zeros((len(partitions), c), dtype=np.int64)
    for i, part in enumerate(partitions):
        hist[i] = np.bincount(y[np.asarray(part, dtype=np.int64)], minlength=c)
    return hist


def format_histogram(
    partitions: Partitions, labels: LabelsLike, num_classes: int, max_rows: int = 20
) -> str:
    """Render client id, size and per-class counts as a text table.

    With more than ``max_rows`` clients, the middle rows are replaced by a ``...`` row.
    A final ``total`` row sums every client.
    """
    hist = label_histogram(partitions, labels, num_classes)
    header = ["client", "size"] + [str(c) for c in range(hist.shape[1])]
    rows: list[list[str]] = [[str(i), str(int(h.sum()))] + [str(int(v)) for v in h] for i, h in enumerate(hist)]
    if max_rows >= 1 and len(rows) > max_rows:
        head = (max_rows + 1) // 2
        tail = max_rows - head
        rows = rows[:head] + [["..."] * len(header)] + (rows[-tail:] if tail else [])
    total = hist.sum(axis=0)
    rows.append(["total", str(int(total.sum()))] + [str(int(v)) for v in total])
    widths = [max(len(r[j]) for r in [header] + rows) for j in range(len(header))]
    lines = [" ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [header] + rows]
    return "\n".join(lines)


def skew_score(partitions: Partitions, labels: LabelsLike, num_classes: int) -> float:
    """Mean total-variation distance between each client's label distribution and the
    global one (0 = IID, up to 1 = disjoint labels). Empty clients are ignored."""
    hist = label_histogram(partitions, labels, num_classes).astype(np.float64)
    y = _as_labels(labels)
    if y.size == 0:
        return 0.0
    global_p = np.bincount(y, minlength=hist.shape[1]) / y.size
    sizes = hist.sum(axis=1)
    nonempty = sizes > 0
    if not nonempty.any():
        return 0.0
    client_p = hist[nonempty] / sizes[nonempty, None]
    tv = 0.5 * np.abs(client_p - global_p).sum(axis=1)
    return float(tv.mean())
