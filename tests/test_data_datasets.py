"""Tests for insitu.data.datasets: TensorDataset, IDX parsing, embedded datasets, MNIST."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from insitu.data import (
    DATASET_NAMES,
    DatasetNotFoundError,
    TensorDataset,
    UnknownDatasetError,
    load_dataset,
)

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


# --------------------------------------------------------------------------- IDX helpers


def idx_images(pixels: np.ndarray, magic: int = 0x00000803, count: int | None = None) -> bytes:
    n, r, c = pixels.shape
    return struct.pack(">IIII", magic, n if count is None else count, r, c) + pixels.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 0x00000801, count: int | None = None) -> bytes:
    return struct.pack(">II", magic, len(labels) if count is None else count) + labels.astype(np.uint8).tobytes()


def write_split(
    directory: Path,
    images: bytes,
    labels: bytes,
    split: str = "train",
    gz: bool = False,
    gz_suffix: bool | None = None,
) -> tuple[Path, Path]:
    """Write an IDX pair under the standard names; gz_suffix decouples name from content."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if (gz if gz_suffix is None else gz_suffix) else ""
    paths = []
    for stem, payload in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        path = directory / (stem + suffix)
        path.write_bytes(gzip.compress(payload) if gz else payload)
        paths.append(path)
    return paths[0], paths[1]


PIXELS = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
LABELS = np.array([7, 0, 9])


def expected_x(pixels: np.ndarray, mean: float, std: float) -> torch.Tensor:
    x = (pixels.astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(x.astype(np.float32)).reshape(len(pixels), 1, *pixels.shape[1:])


# --------------------------------------------------------------------------- IDX round trips


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    write_split(tmp_path, idx_images(PIXELS), idx_labels(LABELS), gz=gz)
    ds = load_dataset("mnist", "train", data_dir=tmp_path)
    assert ds.name == "mnist" and ds.num_classes == 10 and len(ds) == 3
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert ds.x.shape == (3, 1, 28, 28) and ds.input_shape == (1, 28, 28)
    assert ds.x.is_contiguous()
    torch.testing.assert_close(ds.x, expected_x(PIXELS, MNIST_MEAN, MNIST_STD))
    assert ds.y.tolist() == [7, 0, 9]


def test_gzip_detected_by_magic_not_suffix(tmp_path: Path) -> None:
    # gzip content under the raw names, and raw content under .gz names: both load.
    write_split(tmp_path / "a", idx_images(PIXELS), idx_labels(LABELS), gz=True, gz_suffix=False)
    write_split(tmp_path / "b", idx_images(PIXELS), idx_labels(LABELS), gz=False, gz_suffix=True)
    for sub in ("a", "b"):
        ds = load_dataset("mnist", data_dir=tmp_path / sub)
        assert ds.y.tolist() == [7, 0, 9]


def test_fashion_uses_its_normalization_and_layouts(tmp_path: Path) -> None:
    write_split(tmp_path / "FashionMNIST" / "raw", idx_images(PIXELS), idx_labels(LABELS), split="test", gz=True)
    for name in ("fashion-mnist", "Fashion_MNIST", "fmnist", "FMNIST"):
        ds = load_dataset(name, "test", data_dir=tmp_path)
        assert ds.name == "fashion-mnist"
        torch.testing.assert_close(ds.x, expected_x(PIXELS, FASHION_MEAN, FASHION_STD))
    # data_dir/<canonical name> layout
    write_split(tmp_path / "mnist", idx_images(PIXELS), idx_labels(LABELS), split="test")
    assert len(load_dataset("MNIST", "test", data_dir=str(tmp_path))) == 3


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_split(tmp_path, idx_images(PIXELS), idx_labels(LABELS))
    monkeypatch.setenv("INSITU_DATA_DIR", str(tmp_path))
    assert len(load_dataset("mnist")) == 3


# --------------------------------------------------------------------------- corrupt files


def test_corrupt_image_magic(tmp_path: Path) -> None:
    img, _ = write_split(tmp_path, idx_images(PIXELS, magic=0x00000903), idx_labels(LABELS))
    with pytest.raises(ValueError, match="magic") as exc:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(img) in str(exc.value)


def test_corrupt_label_magic_gz(tmp_path: Path) -> None:
    _, lab = write_split(tmp_path, idx_images(PIXELS), idx_labels(LABELS, magic=0x00000803), gz=True)
    with pytest.raises(ValueError, match="magic") as exc:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(lab) in str(exc.value)


def test_truncated_payload(tmp_path: Path) -> None:
    img, _ = write_split(tmp_path, idx_images(PIXELS)[:-5], idx_labels(LABELS))
    with pytest.raises(ValueError, match="truncated") as exc:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(img) in str(exc.value)


def test_header_count_disagrees_with_payload(tmp_path: Path) -> None:
    _, lab = write_split(tmp_path, idx_images(PIXELS), idx_labels(LABELS, count=5))
    with pytest.raises(ValueError) as exc:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(lab) in str(exc.value)


def test_image_label_count_mismatch(tmp_path: Path) -> None:
    img, lab = write_split(tmp_path, idx_images(PIXELS), idx_labels(LABELS[:2]))
    with pytest.raises(ValueError, match="3 images but") as exc:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(img) in str(exc.value) and str(lab) in str(exc.value)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    img, _ = write_split(tmp_path, idx_images(PIXELS), idx_labels(LABELS), gz=True)
    img.write_bytes(img.read_bytes()[:30])
    with pytest.raises(ValueError, match="gzip") as exc:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(img) in str(exc.value)


# --------------------------------------------------------------------------- errors


def test_missing_files_message(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset("mnist", "test", data_dir=missing)
    msg = str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)
    for fragment in (
        str(missing),
        str(missing / "MNIST" / "raw"),
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "--data-dir",
    ):
        assert fragment in msg
    with pytest.raises(DatasetNotFoundError, match="fashion-mnist.s3-website"):
        load_dataset("fashion-mnist", data_dir=missing)


def test_only_other_split_present_is_not_found(tmp_path: Path) -> None:
    write_split(tmp_path, idx_images(PIXELS), idx_labels(LABELS), split="train")
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownDatasetError) as exc:
        load_dataset("cifar-1000")
    assert isinstance(exc.value, ValueError)
    for name in DATASET_NAMES:
        assert name in str(exc.value)


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="train, test"):
        load_dataset("digits", "validation")


# --------------------------------------------------------------------------- embedded datasets


@pytest.mark.parametrize(
    "name, shape, classes, n_train, n_test",
    [("digits", (64,), 10, 1438, 359), ("breast-cancer", (30,), 2, 456, 113)],
)
def test_embedded_datasets(name: str, shape: tuple[int, ...], classes: int, n_train: int, n_test: int) -> None:
    train = load_dataset(name, "train")
    test = load_dataset(name.upper().replace("-", "_"), "test")
    assert (len(train), len(test)) == (n_train, n_test)
    for ds in (train, test):
        assert ds.name == name and ds.num_classes == classes and ds.input_shape == shape
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.is_contiguous()
    # The fixed split is stable across calls, and stratified (class ratios match).
    again = load_dataset(name, "test")
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)
    ratio_train = np.bincount(train.labels_numpy()) / len(train)
    ratio_test = np.bincount(test.labels_numpy()) / len(test)
    np.testing.assert_allclose(ratio_train, ratio_test, atol=0.01)


def test_embedded_split_is_a_partition_of_the_sklearn_data() -> None:
    from sklearn.datasets import load_digits

    raw = torch.from_numpy((load_digits().data / 16.0).astype(np.float32))
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    both = torch.cat([train.x, test.x])
    # Every raw row appears in train or test, and the split is disjoint (counts match).
    rows = {tuple(r.tolist()) for r in both}
    assert rows == {tuple(r.tolist()) for r in raw}
    assert float(train.x.min()) >= 0.0 and float(train.x.max()) <= 1.0


def test_breast_cancer_standardized_with_train_stats() -> None:
    train = load_dataset("breast-cancer", "train")
    torch.testing.assert_close(train.x.mean(0), torch.zeros(30), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.x.std(0, unbiased=False), torch.ones(30), atol=1e-4, rtol=0)
    test = load_dataset("breast-cancer", "test")
    assert float(test.x.mean(0).abs().max()) > 1e-4  # test is not re-standardized


def test_returned_tensors_are_independent_of_cache() -> None:
    a = load_dataset("digits", "train")
    a.x.zero_()
    b = load_dataset("digits", "train")
    assert float(b.x.abs().sum()) > 0


def test_download_idx_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """download_idx is exercised against a fake urlopen: tests never touch the network."""
    import io

    import insitu.data.datasets as datasets_mod
    from insitu.data import download_idx

    payloads = {
        "train-images-idx3-ubyte.gz": idx_images(PIXELS),
        "train-labels-idx1-ubyte.gz": idx_labels(LABELS),
        "t10k-images-idx3-ubyte.gz": idx_images(PIXELS[:2]),
        "t10k-labels-idx1-ubyte.gz": idx_labels(LABELS[:2]),
    }
    requested = []

    def fake_urlopen(url: str, timeout: float = 0):
        requested.append(url)
        return io.BytesIO(gzip.compress(payloads[url.rsplit("/", 1)[1]]))

    monkeypatch.setattr(datasets_mod.urllib.request, "urlopen", fake_urlopen)
    target = download_idx("fmnist", tmp_path)
    assert target == tmp_path / "fashion-mnist"
    assert all(u.startswith("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/") for u in requested)
    assert len(requested) == 4
    assert len(load_dataset("fashion-mnist", "test", data_dir=tmp_path)) == 2
    download_idx("fashion-mnist", tmp_path)  # files present: nothing fetched again
    assert len(requested) == 4
    with pytest.raises(UnknownDatasetError):
        download_idx("digits", tmp_path)


# --------------------------------------------------------------------------- TensorDataset


def _toy() -> TensorDataset:
    x = torch.arange(20, dtype=torch.float32).reshape(5, 2, 2)
    return TensorDataset(x=x, y=torch.tensor([0, 1, 2, 1, 0]), num_classes=3, name="toy")


@pytest.mark.parametrize(
    "indices",
    [np.array([4, 0, 2]), [4, 0, 2], torch.tensor([4, 0, 2]), np.array([4, 0, 2], dtype=np.int32)],
)
def test_subset_index_types(indices) -> None:
    ds = _toy()
    sub = ds.subset(indices)
    assert sub.name == "toy" and sub.num_classes == 3 and len(sub) == 3
    assert sub.y.tolist() == [0, 0, 2]
    assert torch.equal(sub.x, ds.x[[4, 0, 2]])
    assert sub.input_shape == (2, 2)


def test_subset_empty_and_errors() -> None:
    ds = _toy()
    assert len(ds.subset([])) == 0 and len(ds.subset(np.array([], dtype=np.int64))) == 0
    with pytest.raises(IndexError, match="out of range"):
        ds.subset([5])
    with pytest.raises(IndexError, match="out of range"):
        ds.subset([-1])
    with pytest.raises(TypeError, match="boolean mask"):
        ds.subset(np.array([True, False, True, False, True]))
    with pytest.raises(TypeError):
        ds.subset([0.5])


def test_labels_numpy_and_validation() -> None:
    ds = _toy()
    labels = ds.labels_numpy()
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 1, 0]
    with pytest.raises(ValueError, match="number of samples"):
        TensorDataset(x=torch.zeros(4, 2), y=torch.zeros(5, dtype=torch.int64), num_classes=2, name="bad")
    with pytest.raises(TypeError, match="int64"):
        TensorDataset(x=torch.zeros(5, 2), y=torch.zeros(5, dtype=torch.int32), num_classes=2, name="bad")
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "renamed"  # frozen


# --------------------------------------------------------------------------- real MNIST


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"shared MNIST copy not found at {SHARED_MNIST}")
def test_real_mnist() -> None:
    train = load_dataset("mnist", "train", data_dir=SHARED_MNIST)
    test = load_dataset("mnist", "test", data_dir=SHARED_MNIST)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.y.shape == (60000,) and test.y.shape == (10000,)
    np.testing.assert_array_equal(
        np.bincount(train.labels_numpy()), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    )
    np.testing.assert_array_equal(
        np.bincount(test.labels_numpy()), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
    # The normalization constants are MNIST's own statistics.
    assert abs(float(train.x.mean())) < 1e-2 and abs(float(train.x.std()) - 1.0) < 1e-2
