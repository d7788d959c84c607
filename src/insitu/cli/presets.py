"""Settings resolution for ``insitu simulate``: defaults < dataset preset < settings file (TOML or a run's
config.json) < flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from insitu.config import canonical_keys
from insitu.files import load_toml
from insitu.simulation import SimulationConfig

DEMO_DATASET = "digits"

# Per-dataset starting points. MNIST's is the seeds' scenario: 3 clients with 20,000 images each,
# SimpleCNN, SGD lr 0.01, batch 32, one local epoch, five rounds.
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {"model": "mlp", "num_clients": 10, "partition": "dirichlet", "alpha": 0.5, "rounds": 10,
                   "local_epochs": 5, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
    "breast-cancer": {"model": "logreg", "num_clients": 5, "partition": "iid", "rounds": 10,
                          "local_epochs": 5, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
    "mnist": {"model": "simple-cnn", "num_clients": 3, "partition": "iid", "rounds": 5,
                  "local_epochs": 1, "batch_size": 32, "lr": 0.01},
    "fashion-mnist": {"model": "simple-cnn", "num_clients": 3, "partition": "iid", "rounds": 5,
                          "local_epochs": 1, "batch_size": 32, "lr": 0.01},
}


def _canonical(dataset: str) -> str:
    key = dataset.lower().replace("_", "-")
    return {"fmnist": "fashion-mnist"}.get(key, key)


OTHER_COMMANDS_TABLES = ("server", "client")
"""Tables a settings file may hold for other commands (``insitu server`` reads ``[server]``)."""


def read_settings(path: Path, table: str = "simulate") -> dict[str, Any]:
    """The simulation settings in a file (its ``[table]`` if present, else the top level), keys checked
    against ``SimulationConfig`` and made canonical. Beside a ``[table]``, any other top-level key or
    table (say an ``[aggregator_options]`` meant for it) is refused: it would otherwise be ignored."""
    data = load_settings_file(path)
    values = data.get(table, data)
    if table in data:
        stray = sorted(set(data) - {table, *OTHER_COMMANDS_TABLES})
        if stray:
            raise ValueError(f"{path}: {', '.join(stray)} {'is' if len(stray) == 1 else 'are'} outside [{table}] and "
                             f"would be ignored: move {'it' if len(stray) == 1 else 'them'} into [{table}] (a table "
                             f"as [{table}.{stray[0]}])")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: [{table}] must be a table of settings")  # noqa: TRY004 (a user's bad file)
    return canonical_keys(SimulationConfig, values, source=str(path))


def load_settings_file(path: Path) -> dict[str, Any]:
    """A settings file as a dict: TOML, or the ``config.json`` a run wrote (by the ``.json`` suffix)."""
    return load_json(path) if path.suffix.lower() == ".json" else load_toml(path, "config file")


def load_json(path: Path) -> dict[str, Any]:
    """A JSON settings file (e.g. a run's config.json) as a dict; a missing or malformed file names the path."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of settings, got {type(data).__name__}")  # noqa: TRY004
    return data


def resolve_config(config_file: Path | None, flags: dict[str, Any], file_values: dict[str, Any] | None = None
                   ) -> SimulationConfig:
    """Merge the layers; the dataset (from flags, file or demo default) picks the preset.

    ``file_values`` are settings already read from ``config_file`` (a command that reads other tables
    of the file passes them instead of having the file read twice).
    """
    if file_values is None:
        file_values = read_settings(config_file) if config_file else {}
    flags = canonical_keys(SimulationConfig, flags, source="flags")
    dataset = _canonical(str(flags.get("dataset") or file_values.get("dataset") or DEMO_DATASET))
    merged: dict[str, Any] = dict(PRESETS.get(dataset, {}))
    merged.update(file_values)
    merged.update(flags)
    merged["dataset"] = dataset
    return SimulationConfig.from_dict(merged, source=str(config_file) if config_file else "settings")
