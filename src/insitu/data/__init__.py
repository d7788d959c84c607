"""insitu.data: datasets held as tensors, and partitioners that split them among clients."""

from insitu.data.datasets import (
    DATASET_NAMES,
    DatasetNotFoundError,
    TensorDataset,
    UnknownDatasetError,
    default_data_dir,
    download_idx,
    load_dataset,
)
from insitu.data.partition import (
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

__all__ = [
    "DATASET_NAMES",
    "PARTITION_NAMES",
    "DatasetNotFoundError",
    "PartitionError",
    "TensorDataset",
    "UnknownDatasetError",
    "default_data_dir",
    "dirichlet",
    "download_idx",
    "format_histogram",
    "iid",
    "label_histogram",
    "load_dataset",
    "partition",
    "quantity_skew",
    "shards",
    "skew_score",
]
