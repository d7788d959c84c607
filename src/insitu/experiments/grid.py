"""Experiment specs: a TOML file of shared settings, a grid and explicit runs, expanded to validated runs.

Nothing here knows the list of simulation settings: every key goes through
``SimulationConfig.from_dict`` (the schema's key, type and choice checks) + ``validate``, so new
``SimulationConfig`` fields work in experiment files as soon as they exist.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from insitu.config import key_map
from insitu.files import load_toml
from insitu.simulation import SimulationConfig

TOP_LEVEL_KEYS = ("name", "target_accuracy", "presets", "base", "grid", "runs")
LABEL_KEY = "label"


@dataclass
class RunSpec:
    """One run of an experiment: its label, the settings it overrides, and the full validated config."""

    label: str
    overrides: dict[str, Any]
    config: SimulationConfig
    slug: str = ""

    @property
    def seed(self) -> int:
        """The run's seed (runs sharing a label but not a seed are repeats of one setting)."""
        return self.config.seed


@dataclass
class ExperimentSpec:
    """A parsed experiment file: shared settings, grid, explicit runs and report options."""

    name: str = "experiment"
    target_accuracy: float | None = None
    presets: bool = True  # start from the dataset's preset, as ``insitu simulate`` does
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "experiment") -> ExperimentSpec:
        """Check the file's structure (tables, lists, types); unknown top-level keys are an error."""
        unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(TOP_LEVEL_KEYS)} (simulation settings go under [base] or [grid])")
        name = data.get("name", "experiment")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{source}: name must be a non-empty string, got {name!r}")
        target = data.get("target_accuracy")
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                                   or not 0 < target <= 1):
            raise ValueError(f"{source}: target_accuracy must be a number in (0, 1], got {target!r}")
        presets = data.get("presets", True)
        if not isinstance(presets, bool):
            raise ValueError(f"{source}: presets must be true or false, got {presets!r}")  # noqa: TRY004 (a bad file)
        base = data.get("base", {})
        if not isinstance(base, dict):
            raise ValueError(f"{source}: [base] must be a table of settings")  # noqa: TRY004 (a bad file)
        grid = data.get("grid", {})
        if not isinstance(grid, dict):
            raise ValueError(f"{source}: [grid] must be a table of lists")  # noqa: TRY004 (a bad file)
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{source}: grid.{key} must be a non-empty list of values, got {values!r}")
        runs = data.get("runs", [])
        if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
            raise ValueError(f"{source}: runs must be an array of tables ([[runs]])")
        return cls(name.strip(), None if target is None else float(target), presets,
                   _normalize(base), {_key(k): v for k, v in grid.items()}, [_normalize(r) for r in runs])


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read an experiment TOML file (see docs/cli.md, "Experiments")."""
    return ExperimentSpec.from_dict(load_toml(path, "experiment file"), source=str(path))


def expand_grid(spec: ExperimentSpec | dict[str, Any]) -> list[RunSpec]:
    """All runs: the grid's cartesian product, then the explicit runs; each validated before returning.

    A bad key or value raises ``ValueError`` naming it and the run, so nothing trains on a typo.
    """
    if isinstance(spec, dict):
        spec = ExperimentSpec.from_dict(spec)
    points: list[tuple[str | None, dict[str, Any]]] = []
    if spec.grid:
        keys = list(spec.grid)
        for values in itertools.product(*(spec.grid[k] for k in keys)):
            points.append((None, dict(zip(keys, values))))
    elif not spec.runs:
        points.append((None, {}))  # just [base]: one run
    from_grid = len(points)
    for i, explicit in enumerate(spec.runs):
        overrides = dict(explicit)
        label = overrides.pop(LABEL_KEY, None)
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise ValueError(f"runs[{i}]: label must be a non-empty string, got {label!r}")
        seeds = overrides.get("seed")
        if isinstance(seeds, list):  # seed = [0, 1, 2]: the same run repeated over seeds
            if not seeds:
                raise ValueError(f"runs[{i}]: seed list is empty")
            points += [(label, {**overrides, "seed": s}) for s in seeds]
        else:
            points.append((label, overrides))

    varying = [k for k, v in spec.grid.items() if len(v) > 1 and k != "seed"]
    runs: list[RunSpec] = []
    seen: dict[tuple[str, int], int] = {}
    for index, (label, overrides) in enumerate(points):
        if label is None:
            shown = [k for k in overrides if (k in varying if index < from_grid else k != "seed")]
            label = ", ".join(f"{k}={_format(overrides[k])}" for k in shown) or "base"
        config = _config(spec, overrides, where=f"run {label!r}" + (f" (overrides {overrides})" if overrides else ""))
        key = (label, config.seed)
        if key in seen:
            raise ValueError(f"duplicate run: label {label!r} with seed {config.seed} appears twice "
                             f"(runs {seen[key] + 1} and {index + 1}); give [[runs]] distinct labels or seeds")
        seen[key] = index
        runs.append(RunSpec(label, overrides, config))
    width = len(str(len(runs)))
    for i, run in enumerate(runs):
        run.slug = f"{i + 1:0{width}d}-{_slug(run.label)}-seed{run.seed}"
    return runs


def _config(spec: ExperimentSpec, overrides: dict[str, Any], where: str) -> SimulationConfig:
    """Base + overrides (+ the dataset preset) as a validated SimulationConfig, errors naming ``where``."""
    values = {**spec.base, **overrides}
    try:
        if spec.presets:
            from insitu.cli.presets import resolve_config

            config = resolve_config(None, {}, file_values=values)
        else:
            config = SimulationConfig.from_dict(values)
        _check_dataset(config)
        config.validate()
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}: {error}") from None
    return config


def _check_dataset(config: SimulationConfig) -> None:
    from insitu.data import DATASET_NAMES

    if isinstance(config.dataset, str) and config.dataset.replace("_", "-").lower() not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {config.dataset!r}; valid names: {', '.join(DATASET_NAMES)}")


def _key(key: str) -> str:
    """A setting's field name for any of its keys (``clients`` -> ``num_clients``); unknown keys stay as
    given, for ``SimulationConfig.from_dict`` to name."""
    key = key.replace("-", "_")
    return key_map(SimulationConfig).get(key, key)


def _normalize(values: dict[str, Any]) -> dict[str, Any]:
    return {_key(k): v for k, v in values.items()}


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _slug(label: str) -> str:
    """A folder-safe form of a label: ``strategy=fedavg, lr=0.1`` -> ``strategy=fedavg_lr=0.1``."""
    slug = re.sub(r"[^A-Za-z0-9.=+-]+", "_", label).strip("_.")
    return slug[:80] or "run"
