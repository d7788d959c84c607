"""Geometric median (RFA, Pillutla et al. 2022): hand-computed points, robustness, convergence, and its
reach from the CLI and TOML through the registry alone."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from insitu.aggregation import make_reducer
from insitu.aggregation.rules.geometric_median import geometric_median


def run(reducer, rows, weights=None):
    rows = [np.asarray(r, dtype=np.float32) for r in rows]
    weights = weights if weights is not None else [1.0] * len(rows)
    acc = reducer.start(rows[0].size)
    for row, weight in zip(rows, weights):
        acc = reducer.add(acc, row.copy(), weight)
    return reducer.finish(acc)


def objective(z, rows, weights):
    rows, weights = np.asarray(rows, np.float64), np.asarray(weights, np.float64)
    return float(weights @ np.linalg.norm(rows - z, axis=1) / weights.sum())


# -- by hand -----------------------------------------------------------------------------------
def test_equilateral_triangle_gives_its_centroid():
    # every angle is 60 degrees < 120: the Fermat point, here the centroid (1, sqrt(3) / 3)
    out, report = run(geometric_median(tol=1e-12), [[0, 0], [2, 0], [1, np.sqrt(3)]])
    np.testing.assert_allclose(out, [1.0, np.sqrt(3) / 3], atol=1e-6)
    assert report["iterations"] >= 1


def test_a_vertex_with_an_angle_of_120_degrees_or_more_is_the_median():
    # the angle at the origin between (1, 0) and (-1, 0.1) is ~174 degrees: the median is the origin
    out, _ = run(geometric_median(max_iter=1000, tol=1e-12), [[0, 0], [1, 0], [-1, 0.1]])
    np.testing.assert_allclose(out, [0.0, 0.0], atol=1e-4)


def test_on_a_line_it_is_the_weighted_median():
    out, _ = run(geometric_median(max_iter=1000, tol=1e-12), [[0.0], [1.0], [10.0]])
    assert out[0] == pytest.approx(1.0, abs=1e-4)
    # 3 |z| + |z - 10| is smallest at z = 0: the example weights count
    out, _ = run(geometric_median(max_iter=1000, tol=1e-12), [[0.0], [10.0]], [3.0, 1.0])
    assert out[0] == pytest.approx(0.0, abs=1e-4)


# -- robustness and convergence -----------------------------------------------------------------
def test_a_minority_of_huge_outliers_barely_moves_it():
    rng = np.random.default_rng(0)
    benign = rng.normal(1.0, 0.1, size=(8, 20))
    attacked = [*benign, *np.full((3, 20), 1e6)]  # 3 of 11, each 1e6 per coordinate
    clean, _ = run(geometric_median(), benign)
    out, _ = run(geometric_median(), attacked, [1.0] * 11)
    assert np.linalg.norm(out - clean) < 0.25  # the exact median moves 0.17; benign points lie ~0.4 from it
    assert np.linalg.norm(np.mean(attacked, axis=0) - clean) > 1e5  # the mean is carried away


def test_it_stops_within_the_tolerance_and_reports_its_iterations():
    rng = np.random.default_rng(1)
    rows, weights = rng.normal(size=(9, 5)), rng.uniform(1, 10, size=9)
    best, _ = run(geometric_median(max_iter=10_000, tol=1e-12), rows, weights)
    best_value = objective(best, rows, weights)
    scale = float(np.median(np.linalg.norm(rows - best, axis=1)))
    steps = []
    for tol in (1e-2, 1e-4, 1e-6):
        out, report = run(geometric_median(max_iter=10_000, tol=tol), rows, weights)
        assert np.linalg.norm(out - best) <= 100 * tol * scale + 1e-6  # linear convergence: the rest is ~ the last step
        assert objective(out, rows, weights) >= best_value - 1e-6
        steps.append(report["iterations"])
    assert steps == sorted(steps) and steps[0] < steps[-1]  # tighter tolerance, more steps
    assert run(geometric_median(max_iter=1), rows, weights)[1] == {"iterations": 1}


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_iter must be an int >= 1"):
        geometric_median(max_iter=0)
    with pytest.raises(ValueError, match="tol > 0 and smoothing nu > 0"):
        geometric_median(nu=0.0)


# -- reachable by name alone --------------------------------------------------------------------
def test_registered_with_its_options():
    reducer = make_reducer("geometric_median", max_iter="7", tol=1e-5)  # CLI strings take the declared type
    assert repr(reducer) == "geometric_median(max_iter=7, tol=1e-05, nu=1e-06)"
    assert reducer.properties.uses_weights and reducer.properties.needs_individual


def test_from_the_command_line_and_toml(tmp_path):
    insitu = shutil.which("insitu") or str(Path(sys.executable).parent / "insitu")
    env = {"COLUMNS": "200", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    config = tmp_path / "fl.toml"
    config.write_text('[simulate]\ndataset = "breast-cancer"\nclients = 4\nrounds = 1\nmodel = "logreg"\n'
                      'aggregator = "geometric_median"\n')
    proc = subprocess.run([insitu, "simulate", "--config", str(config), "--aggregator-option", "max_iter=20",
                           "-o", str(tmp_path / "out")], check=False, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["aggregator"] == "geometric_median" and saved["aggregator_options"] == {"max_iter": 20}
