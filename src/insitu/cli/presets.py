"""Settings resolution for ``insitu simulate``: defaults < dataset preset < TOML file < flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from insitu.files import load_toml
from insitu.simulation import SimulationConfig

DEMO_DATASET = "digits"

# Per-dataset starting points. MNIST's is the seeds' scenario: 3 clients with 20,000 images each,
# SimpleCNN, SGD lr 0.01, batch 32, one local epoch, five rounds.
PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(model="mlp", num_clients=10, partition="dirichlet", alpha=0.5, rounds=10,
                   local_epochs=5, batch_size=32, lr=0.1, momentum=0.9),
    "breast-cancer": dict(model="logreg", num_clients=5, partition="iid", rounds=10,
                          local_epochs=5, batch_size=16, lr=0.05, momentum=0.9),
    "mnist": dict(model="simple-cnn", num_clients=3, partition="iid", rounds=5,
                  local_epochs=1, batch_size=32, lr=0.01),
    "fashion-mnist": dict(model="simple-cnn", num_clients=3, partition="iid", rounds=5,
                          local_epochs=1, batch_size=32, lr=0.01),
}


def _canonical(dataset: str) -> str:
    key = dataset.lower().replace("_", "-")
    return {"fmnist": "fashion-mnist"}.get(key, key)


def read_toml(path: Path) -> dict[str, Any]:
    """Read a settings file; a ``[simulate]`` table is used if present, else the top level."""
    data = load_toml(path, "config file")
    table = data.get("simulate", data)
    aliases = {"clients": "num_clients", "fraction": "fraction_fit"}
    return {aliases.get(k.replace("-", "_"), k): v for k, v in table.items()}


def resolve_config(config_file: Path | None, flags: dict[str, Any]) -> SimulationConfig:
    """Merge the layers; the dataset (from flags, file or demo default) picks the preset."""
    file_values = read_toml(config_file) if config_file else {}
    dataset = _canonical(str(flags.get("dataset") or file_values.get("dataset") or DEMO_DATASET))
    merged: dict[str, Any] = dict(PRESETS.get(dataset, {}))
    merged.update(file_values)
    merged.update(flags)
    merged["dataset"] = dataset
    return SimulationConfig.from_dict(merged)
