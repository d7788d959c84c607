"""Tests for insitu.data.partition: correctness, determinism, skew and validation."""

from __future__ import annotations

import numpy as np
import pytest

from insitu.data import (
    PARTITION_NAMES,
    PartitionError,
    dirichlet,
    format_histogram,
    iid,
    label_histogram,
    partition,
    quantity_skew,
    shards,
    skew_score,
)

# MNIST-like labels: 10 classes x 600 samples, shuffled so sorting actually matters.
MNIST_LIKE = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 600))


def _assert_valid(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert isinstance(p, np.ndarray) and p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0), "each client's indices are sorted and unique"
    allidx = np.concatenate(parts)
    assert len(allidx) == n, "disjoint and complete: every sample exactly once"
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


SCHEMES = {
    "iid": lambda y, k, seed: iid(len(y), k, seed=seed),
    "dirichlet": lambda y, k, seed: dirichlet(y, k, alpha=0.5, seed=seed),
    "shards": lambda y, k, seed: shards(y, k, shards_per_client=2, seed=seed),
    "quantity": lambda y, k, seed: quantity_skew(len(y), k, alpha=0.5, seed=seed),
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("num_clients", [1, 7, 20])
def test_disjoint_complete_deterministic(scheme: str, num_clients: int) -> None:
    fn = SCHEMES[scheme]
    a = fn(MNIST_LIKE, num_clients, 0)
    _assert_valid(a, len(MNIST_LIKE), num_clients)
    b = fn(MNIST_LIKE, num_clients, 0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_different_seed_changes_result(scheme: str) -> None:
    a = SCHEMES[scheme](MNIST_LIKE, 10, 0)
    b = SCHEMES[scheme](MNIST_LIKE, 10, 1)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("scheme", PARTITION_NAMES)
def test_dispatcher_matches_direct_calls(scheme: str) -> None:
    via = partition(MNIST_LIKE, 10, scheme, seed=3, alpha=0.5, shards_per_client=2)
    direct = SCHEMES[scheme](MNIST_LIKE, 10, 3)
    assert all(np.array_equal(x, y) for x, y in zip(via, direct))


def test_dispatcher_accepts_count_for_label_free_schemes() -> None:
    _assert_valid(partition(100, 4, "iid", seed=0), 100, 4)
    _assert_valid(partition(100, 4, "quantity_skew", seed=0), 100, 4)
    with pytest.raises(PartitionError, match="needs the label array"):
        partition(100, 4, "dirichlet", seed=0)


def test_dispatcher_unknown_scheme_lists_names() -> None:
    with pytest.raises(PartitionError) as exc:
        partition(MNIST_LIKE, 4, "pathological-ish", seed=0)
    for name in PARTITION_NAMES:
        assert name in str(exc.value)


# --------------------------------------------------------------------------- iid


def test_iid_equal_shares() -> None:
    parts = iid(60000, 3, seed=0)
    assert [len(p) for p in parts] == [20000, 20000, 20000]
    parts = iid(10, 3, seed=0)
    assert sorted(len(p) for p in parts) == [3, 3, 4]


def test_iid_is_not_just_contiguous_blocks() -> None:
    parts = iid(1000, 2, seed=0)
    assert not np.array_equal(parts[0], np.arange(500))


# --------------------------------------------------------------------------- shards


def test_shards_hand_computed_blocks() -> None:
    # 5 classes x 4 samples, shuffled; 5 clients x 2 shards -> 10 shards of 2 samples.
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(5), 4))
    order = np.argsort(labels, kind="stable")
    expected_shards = {tuple(np.sort(order[i : i + 2])) for i in range(0, 20, 2)}
    parts = shards(labels, 5, shards_per_client=2, seed=7)
    _assert_valid(parts, 20, 5)
    seen = []
    for p in parts:
        assert len(p) == 4
        # Each client's samples are the union of exactly 2 of the expected shards.
        own = [s for s in expected_shards if set(s) <= set(p.tolist())]
        assert len(own) == 2 and set(own[0]) | set(own[1]) == set(p.tolist())
        # A shard here is always a single-label block.
        for s in own:
            assert len(set(labels[list(s)])) == 1
        seen += own
    assert sorted(seen) == sorted(expected_shards)


def test_shards_mcmahan_sizes() -> None:
    labels = np.repeat(np.arange(10), 6000)
    parts = shards(labels, 100, shards_per_client=2, seed=0)
    _assert_valid(parts, 60000, 100)
    assert all(len(p) == 600 for p in parts)
    hist = label_histogram(parts, labels, 10)
    # 300-sample shards of single-class blocks: each client sees at most 2 classes.
    assert ((hist > 0).sum(axis=1) <= 2).all()
    assert set(np.unique(hist)) <= {0, 300, 600}


def test_shards_remainder_is_not_lost() -> None:
    labels = np.repeat(np.arange(3), 7)  # 21 samples, 4 shards of 5 + 1 leftover
    parts = shards(labels, 2, shards_per_client=2, seed=0)
    _assert_valid(parts, 21, 2)
    assert sorted(len(p) for p in parts) == [10, 11]


# --------------------------------------------------------------------------- dirichlet


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    scores = [
        skew_score(dirichlet(MNIST_LIKE, 20, alpha=a, seed=0), MNIST_LIKE, 10)
        for a in (100.0, 1.0, 0.1)
    ]
    assert scores[0] < scores[1] < scores[2]
    assert scores[0] < 0.1 and scores[2] > 0.5
    iid_score = skew_score(iid(len(MNIST_LIKE), 20, seed=0), MNIST_LIKE, 10)
    assert iid_score < 0.1


def test_dirichlet_min_size_respected() -> None:
    parts = dirichlet(MNIST_LIKE, 20, alpha=0.1, seed=0, min_size=10)
    assert min(len(p) for p in parts) >= 10
    # MNIST scale, the usual FL setting: 100 clients, alpha=0.1.
    big = np.repeat(np.arange(10), 6000)
    parts = dirichlet(big, 100, alpha=0.1, seed=0, min_size=10)
    _assert_valid(parts, len(big), 100)
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_impossible_min_size_gives_advice() -> None:
    labels = np.repeat(np.arange(2), 50)
    with pytest.raises(PartitionError, match="raise alpha") as exc:
        dirichlet(labels, 10, alpha=0.01, seed=0, min_size=10, max_retries=5)
    assert "fewer clients" in str(exc.value) and "min_size" in str(exc.value)


# --------------------------------------------------------------------------- quantity skew


def test_quantity_skew_sizes_vary_and_respect_min_size() -> None:
    parts = quantity_skew(6000, 10, alpha=0.3, seed=0, min_size=50)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 6000 and min(sizes) >= 50
    assert max(sizes) > 3 * min(sizes)
    # Near-uniform with a large alpha.
    sizes = [len(p) for p in quantity_skew(6000, 10, alpha=1e4, seed=0)]
    assert max(sizes) - min(sizes) < 100


def test_quantity_skew_min_size_equal_to_share_is_exact() -> None:
    parts = quantity_skew(40, 4, alpha=0.1, seed=0, min_size=10)
    assert [len(p) for p in parts] == [10, 10, 10, 10]


# --------------------------------------------------------------------------- diagnostics


def test_label_histogram_and_skew_score_hand_computed() -> None:
    labels = np.array([0, 0, 1, 1])
    parts = [np.array([0, 1]), np.array([2, 3])]
    np.testing.assert_array_equal(label_histogram(parts, labels, 2), [[2, 0], [0, 2]])
    assert skew_score(parts, labels, 2) == pytest.approx(0.5)
    parts = [np.array([0, 2]), np.array([1, 3])]
    assert skew_score(parts, labels, 2) == pytest.approx(0.0)


def test_format_histogram_elides_middle_rows() -> None:
    parts = iid(len(MNIST_LIKE), 30, seed=0)
    text = format_histogram(parts, MNIST_LIKE, 10, max_rows=6)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["client", "size", "0"]
    # header + 3 head rows + "..." + 3 tail rows + total
    assert len(lines) == 9
    assert lines[4].split()[0] == "..."
    assert lines[1].split()[0] == "0" and lines[7].split()[0] == "29"
    assert lines[-1].split()[:2] == ["total", "6000"]
    short = format_histogram(parts[:3], MNIST_LIKE, 10)
    assert "..." not in short and len(short.splitlines()) == 5


def test_label_histogram_rejects_out_of_range_label() -> None:
    with pytest.raises(PartitionError, match="out of range"):
        label_histogram([np.array([0])], np.array([5]), 3)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: iid(10, 0, seed=0), "num_clients must be >= 1"),
        (lambda: iid(3, 4, seed=0), "more clients"),
        (lambda: dirichlet(MNIST_LIKE[:5], 6, alpha=1.0, seed=0), "more clients"),
        (lambda: dirichlet(MNIST_LIKE, 4, alpha=0.0, seed=0), "alpha"),
        (lambda: dirichlet(MNIST_LIKE, 4, alpha=-1.0, seed=0), "alpha"),
        (lambda: dirichlet(MNIST_LIKE, 4, alpha=float("nan"), seed=0), "alpha"),
        (lambda: quantity_skew(100, 4, alpha=float("inf"), seed=0), "alpha"),
        (lambda: shards(MNIST_LIKE, 4, shards_per_client=0, seed=0), "shards_per_client"),
        (lambda: shards(MNIST_LIKE[:10], 4, shards_per_client=3, seed=0), "shards"),
        (lambda: dirichlet(MNIST_LIKE[:100], 10, alpha=1.0, seed=0, min_size=11), "min_size"),
        (lambda: quantity_skew(100, 10, alpha=1.0, seed=0, min_size=11), "min_size"),
        (lambda: dirichlet(np.array([[0, 1]]), 1, alpha=1.0, seed=0), "1-D"),
        (lambda: dirichlet(np.array([0.5, 1.0]), 1, alpha=1.0, seed=0), "integers"),
        (lambda: partition(MNIST_LIKE, 4, "bogus", seed=0), "unknown partition scheme"),
        (lambda: iid(10, 2, seed=None), "seed"),
        (lambda: shards(MNIST_LIKE, 2, seed=-1), "seed"),
    ],
)
def test_validation_errors(call, match: str) -> None:
    with pytest.raises(PartitionError, match=match):
        call()


def test_partition_error_is_value_error_and_says_fix() -> None:
    assert issubclass(PartitionError, ValueError)
    with pytest.raises(PartitionError) as exc:
        quantity_skew(100, 10, alpha=1.0, seed=0, min_size=11)
    assert "at most 10" in str(exc.value)
