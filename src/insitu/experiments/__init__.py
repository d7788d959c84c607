"""Experiments: a grid of simulations from one TOML file, summarized into tables and plots.

``load_spec`` reads the file, ``expand_grid`` turns it into validated runs (nothing trains on a
typo), ``run_experiment`` runs them and ``write_results`` writes results.csv/.md and the plots.
"""

from insitu.experiments.grid import ExperimentSpec, RunSpec, expand_grid, load_spec
from insitu.experiments.report import results_markdown, write_results
from insitu.experiments.runner import (
    Fairness,
    RunSummary,
    fairness,
    rounds_to_target,
    run_experiment,
    summarize,
)

__all__ = [
    "ExperimentSpec", "Fairness", "RunSpec", "RunSummary", "expand_grid", "fairness", "load_spec",
    "results_markdown", "rounds_to_target", "run_experiment", "summarize", "write_results",
]
