"""insitu.data: datasets held as tensors, your own files read into them (``load_data``), and partitioners that
split them among clients."""

from insitu.data.datasets import (
    DATASET_NAMES,
    DatasetNotFoundError,
    TensorDataset,
    UnknownDatasetError,
    default_data_dir,
    download_idx,
    load_dataset,
)
from insitu.data.files import DATA_FORMATS, DataSpec, LoadedData, load_data
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
    "DATA_FORMATS",
    "PARTITION_NAMES",
    "DataSpec",
    "DatasetNotFoundError",
    "LoadedData",
    "PartitionError",
    "TensorDataset",
    "UnknownDatasetError",
    "default_data_dir",
    "dirichlet",
    "download_idx",
    "format_histogram",
    "iid",
    "label_histogram",
    "load_data",
    "load_dataset",
    "partition",
    "quantity_skew",
    "shards",
    "skew_score",
]
