"""Run every point of an experiment and boil each history down to a comparable summary."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from insitu.experiments.grid import ExperimentSpec, RunSpec, expand_grid
from insitu.run.history import History
from insitu.simulation import run_simulation

CLIENT_ACCURACY_KEY = "eval_accuracy"  # what the loop records per client after federated evaluation


@dataclass
class Fairness:
    """How evenly the global model serves the clients: their local test accuracies at one round."""

    round: int
    n_clients: int
    mean: float
    worst10: float  # mean accuracy of the worst 10% of clients (at least one)
    std: float
    accuracies: list[float] = field(default_factory=list)  # sorted, lowest first


@dataclass
class RunSummary:
    """One run's outcome: headline numbers, fairness, extra final metrics, time, or why it failed."""

    label: str
    seed: int
    slug: str
    overrides: dict[str, Any]
    status: str = "ok"  # "ok" or "failed" (the run raised; see error)
    error: str | None = None
    rounds: int = 0
    failed_rounds: int = 0
    final_accuracy: float | None = None
    best_accuracy: float | None = None
    final_loss: float | None = None
    rounds_to_target: int | None = None
    fairness: Fairness | None = None
    extra_metrics: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (round, headline accuracy); 0 = initial
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


OnRun = Callable[[RunSummary, int, int], None]


def run_experiment(spec: ExperimentSpec | list[RunSpec], out_dir: str | Path, on_run: OnRun | None = None,
                   target_accuracy: float | None = None) -> list[RunSummary]:
    """Run all points (all validated first), one after another; a run that raises is recorded, not fatal.

    Each run's ``history.json`` and ``config.json`` go to ``out_dir/runs/<slug>/``; ``on_run(summary,
    number, total)`` is called as each run finishes. ``target_accuracy`` defaults to the spec's.
    """
    if isinstance(spec, ExperimentSpec):
        runs = expand_grid(spec)  # raises before anything trains
        target = spec.target_accuracy if target_accuracy is None else target_accuracy
    else:
        runs, target = spec, target_accuracy
    out = Path(out_dir)
    summaries: list[RunSummary] = []
    for number, run in enumerate(runs, start=1):
        run_dir = out / "runs" / run.slug
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(run.config), indent=2))
        started = time.perf_counter()
        try:
            _, result = run_simulation(run.config)
        except Exception as error:  # noqa: BLE001 - one broken run must not end the grid
            summary = RunSummary(run.label, run.seed, run.slug, run.overrides, status="failed",
                                 error=f"{type(error).__name__}: {error}")
            (run_dir / "error.txt").write_text(traceback.format_exc())
        else:
            result.history.save_json(run_dir / "history.json")
            summary = summarize(run, result.history, target)
        summary.wall_s = time.perf_counter() - started
        summaries.append(summary)
        if on_run is not None:
            on_run(summary, number, len(runs))
    return summaries


def summarize(run: RunSpec, history: History, target_accuracy: float | None = None) -> RunSummary:
    """The numbers the results table compares, from one run's history."""
    headed = [r for r in history.rounds if r.headline is not None]
    accuracies = [r.accuracy for r in headed if r.accuracy is not None]
    curve = [(0, history.initial.accuracy)] if history.initial and history.initial.accuracy is not None else []
    curve += [(r.round, r.accuracy) for r in headed if r.accuracy is not None]
    last_central = next((r.centralized for r in reversed(history.rounds) if r.centralized is not None), None)
    extras = {k: float(v) for k, v in (last_central.metrics if last_central else {}).items() if k != "accuracy"}
    spent = next((r.fit_metrics["epsilon"] for r in reversed(history.rounds) if "epsilon" in r.fit_metrics), None)
    if spent is not None:  # central DP: the privacy spent by the end of the run
        extras["epsilon"] = float(spent)
    return RunSummary(
        run.label, run.seed, run.slug, run.overrides,
        rounds=len(history.rounds),
        failed_rounds=len(history.failed_rounds),
        final_accuracy=history.final_accuracy,
        best_accuracy=max(accuracies) if accuracies else None,
        final_loss=headed[-1].loss if headed else None,
        rounds_to_target=rounds_to_target(history, target_accuracy) if target_accuracy is not None else None,
        fairness=fairness(history),
        extra_metrics=extras,
        curve=curve,
    )


def rounds_to_target(history: History, target: float) -> int | None:
    """The first round whose headline accuracy reaches ``target``, or None if none does."""
    return next((r.round for r in history.rounds if r.accuracy is not None and r.accuracy >= target), None)


def fairness(history: History, key: str = CLIENT_ACCURACY_KEY) -> Fairness | None:
    """Per-client accuracy spread at the last round where clients evaluated; None if none did."""
    for record in reversed(history.rounds):
        values = sorted(float(m[key]) for m in record.clients.values() if key in m)
        if values:
            worst = max(1, -(-len(values) // 10))  # ceil(10%), at least one client
            array = np.asarray(values)
            return Fairness(record.round, len(values), float(array.mean()), float(array[:worst].mean()),
                            float(array.std()), values)
    return None
