"""Experiments: grid expansion and validation, the summary math, reports, and the real `insitu experiment`."""

import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from insitu.cli.main import app
from insitu.experiments import (
    ExperimentSpec,
    expand_grid,
    fairness,
    load_spec,
    rounds_to_target,
    run_experiment,
    write_results,
)
from insitu.experiments import runner as runner_module
from insitu.experiments.grid import RunSpec
from insitu.run.history import Evaluation, History, RoundRecord
from insitu.simulation import SimulationConfig

INSITU = shutil.which("insitu") or str(Path(sys.executable).parent / "insitu")
BASE = {"dataset": "digits", "rounds": 2}


def _words(text: str) -> str:
    """Output with rich's line wrapping undone, for substring checks."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- grid expansion


def test_grid_is_the_cartesian_product_labelled_by_the_keys_that_vary():
    runs = expand_grid({"base": BASE, "grid": {"strategy": ["fedavg", "fedsgd"], "seed": [0, 1], "lr": [0.05]}})
    assert [(r.label, r.seed) for r in runs] == [
        ("strategy=fedavg", 0), ("strategy=fedavg", 1), ("strategy=fedsgd", 0), ("strategy=fedsgd", 1)]
    assert [r.config.strategy for r in runs] == ["fedavg", "fedavg", "fedsgd", "fedsgd"]
    assert all(r.config.lr == 0.05 and r.config.rounds == 2 for r in runs)
    assert runs[0].config.model == "mlp"  # the digits preset, as `insitu simulate` uses
    assert runs[0].overrides == {"strategy": "fedavg", "seed": 0, "lr": 0.05}
    assert len({r.slug for r in runs}) == 4 and runs[0].slug == "1-strategy=fedavg-seed0"


def test_two_varying_keys_dash_keys_aliases_and_no_presets():
    runs = expand_grid({"presets": False, "base": {"num-clients": 4, "rounds": 1},
                        "grid": {"lr": [0.1, 0.01], "local-epochs": [1, 2], "clients": [4]}})
    assert [r.label for r in runs] == ["lr=0.1, local_epochs=1", "lr=0.1, local_epochs=2",
                                       "lr=0.01, local_epochs=1", "lr=0.01, local_epochs=2"]
    assert runs[3].config.local_epochs == 2 and runs[3].config.num_clients == 4
    assert runs[0].config.model == SimulationConfig().model  # presets = false: plain defaults


def test_explicit_runs_beside_the_grid_with_labels_and_seed_lists():
    runs = expand_grid({"base": BASE, "grid": {"strategy": ["fedavg"]},
                        "runs": [{"label": "fedavg-lr0.1", "lr": 0.1}, {"strategy": "fedsgd", "seed": [3, 4]}]})
    assert [(r.label, r.seed) for r in runs] == [
        ("base", 0), ("fedavg-lr0.1", 0), ("strategy=fedsgd", 3), ("strategy=fedsgd", 4)]
    assert runs[1].config.lr == 0.1 and "label" not in runs[1].overrides
    assert expand_grid({"base": BASE})[0].label == "base"  # no grid, no runs: one run of [base]
    assert [r.label for r in expand_grid({"base": BASE, "runs": [{"lr": 0.2}]})] == ["lr=0.2"]


def test_duplicate_label_and_seed_is_an_error():
    with pytest.raises(ValueError, match="duplicate run: label 'a' with seed 0"):
        expand_grid({"base": BASE, "runs": [{"label": "a", "lr": 0.1}, {"label": "a", "lr": 0.2}]})
    repeated = expand_grid({"base": BASE, "runs": [{"label": "a"}, {"label": "a", "seed": 1}]})  # over seeds: fine
    assert [(r.label, r.seed) for r in repeated] == [("a", 0), ("a", 1)]


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"stratgy": ["fedavg"]}}, r"unknown setting\(s\) stratgy"),
    ({"base": {"roundz": 3}}, r"unknown setting\(s\) roundz"),
    ({"grid": {"strategy": ["fedavg", "nope"]}}, "run 'strategy=nope'.*unknown strategy 'nope'"),
    ({"base": {"rounds": "ten"}}, "rounds must be int, got 'ten'"),
    ({"base": {"lr": [0.1]}}, "lr must be float"),
    ({"base": {"dataset": "cifar"}}, "unknown dataset 'cifar'"),
    ({"grid": {"strategy": "fedavg"}}, "grid.strategy must be a non-empty list"),
    ({"grid": {"seed": []}}, "grid.seed must be a non-empty list"),
    ({"target": 0.9}, "unknown top-level key.*target"),
    ({"target_accuracy": 90}, r"target_accuracy must be a number in \(0, 1\]"),
    ({"runs": [{"label": 3}]}, "label must be a non-empty string"),
])
def test_bad_settings_fail_naming_the_key_or_value(spec, message):
    with pytest.raises(ValueError, match=message):
        expand_grid(spec)


def test_a_bad_grid_point_fails_before_any_run_starts(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner_module, "run_simulation", lambda config: calls.append(config))
    spec = ExperimentSpec.from_dict({"base": BASE, "grid": {"strategy": ["fedavg", "nope"]}})
    with pytest.raises(ValueError, match="nope"):
        run_experiment(spec, tmp_path)
    assert calls == [] and not (tmp_path / "runs").exists()


def test_load_spec_reads_toml_and_reports_missing_or_broken_files(tmp_path):
    path = tmp_path / "e.toml"
    path.write_text('name = "t"\ntarget_accuracy = 0.9\n[base]\ndataset = "digits"\n[grid]\nseed = [0, 1]\n')
    spec = load_spec(path)
    assert (spec.name, spec.target_accuracy, spec.grid) == ("t", 0.9, {"seed": [0, 1]})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")
    path.write_text("[base\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_spec(path)


# --------------------------------------------------------------------------- summary math


def _round(n, accuracy, clients=None, **metrics):
    return RoundRecord(round=n, centralized=Evaluation(1.0 - accuracy, {"accuracy": accuracy, **metrics}),
                       clients=clients or {})


def test_rounds_to_target_is_the_first_round_reaching_it():
    history = History([_round(1, 0.5), _round(2, 0.8), _round(3, 0.79), _round(4, 0.9)])
    assert rounds_to_target(history, 0.8) == 2
    assert rounds_to_target(history, 0.85) == 4
    assert rounds_to_target(history, 0.5) == 1
    assert rounds_to_target(history, 0.95) is None


def test_fairness_uses_the_last_round_with_client_evaluations():
    evaluated = {str(i): {"num_examples": 5, "eval_accuracy": a} for i, a in enumerate([0.9, 0.1, 1.0, 0.5])}
    evaluated["9"] = {"num_examples": 5}  # trained but did not evaluate: not counted
    history = History([_round(1, 0.3, {"0": {"eval_accuracy": 0.0}}), _round(2, 0.6, evaluated),
                       _round(3, 0.7, {"0": {"num_examples": 5, "loss": 0.2}})])
    f = fairness(history)
    assert f.round == 2 and f.n_clients == 4
    assert f.accuracies == [0.1, 0.5, 0.9, 1.0]
    assert f.mean == pytest.approx(0.625)
    assert f.worst10 == pytest.approx(0.1)  # 10% of 4 clients rounds up to one client
    assert f.std == pytest.approx(math.sqrt((0.525**2 + 0.125**2 + 0.275**2 + 0.375**2) / 4))
    twenty = {str(i): {"eval_accuracy": i / 20} for i in range(20)}
    assert fairness(History([_round(1, 0.5, twenty)])).worst10 == pytest.approx((0.0 + 0.05) / 2)
    assert fairness(History([_round(1, 0.5)])) is None  # federated evaluation off


def test_summary_reports_best_final_loss_and_extra_central_metrics():
    history = History([_round(1, 0.6, attack_success_rate=0.5), _round(2, 0.9, attack_success_rate=0.25),
                       _round(3, 0.8, attack_success_rate=0.125)], initial=Evaluation(2.3, {"accuracy": 0.1}))
    run = RunSpec("x", {}, SimulationConfig(seed=3), "1-x-seed3")
    s = runner_module.summarize(run, history, target_accuracy=0.85)
    assert (s.final_accuracy, s.best_accuracy, s.final_loss, s.rounds_to_target) == (0.8, 0.9, pytest.approx(0.2), 2)
    assert s.extra_metrics == {"attack_success_rate": 0.125} and s.seed == 3 and s.fairness is None
    assert s.curve == [(0, 0.1), (1, 0.6), (2, 0.9), (3, 0.8)]


# --------------------------------------------------------------------------- runner + report without training


def _fake_run_simulation(config):
    """A stand-in for run_simulation: fedsgd raises, others "train" to 0.5 + seed/10 with two client scores."""
    if config.strategy == "fedsgd":
        raise RuntimeError("boom")
    acc = 0.5 + config.seed / 10
    clients = {"0": {"eval_accuracy": acc - 0.2}, "1": {"eval_accuracy": acc + 0.2}}
    history = History([_round(1, acc - 0.1), _round(2, acc, clients, attack_success_rate=0.5)])
    return None, SimpleNamespace(history=history)


def test_failed_runs_are_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module, "run_simulation", _fake_run_simulation)
    spec = ExperimentSpec.from_dict({"name": "fake", "target_accuracy": 0.55, "base": BASE,
                                     "grid": {"strategy": ["fedsgd", "fedavg"], "seed": [0, 1]}})
    seen = []
    summaries = run_experiment(spec, tmp_path, on_run=lambda s, n, total: seen.append((s.label, n, total)))
    assert seen == [("strategy=fedsgd", 1, 4), ("strategy=fedsgd", 2, 4), ("strategy=fedavg", 3, 4),
                    ("strategy=fedavg", 4, 4)]
    assert [s.status for s in summaries] == ["failed", "failed", "ok", "ok"]
    assert summaries[0].error == "RuntimeError: boom"
    assert "boom" in (tmp_path / "runs" / summaries[0].slug / "error.txt").read_text()
    assert (tmp_path / "runs" / summaries[2].slug / "history.json").is_file()
    assert [s.rounds_to_target for s in summaries[2:]] == [None, 2]
    assert summaries[3].fairness.worst10 == pytest.approx(0.4)

    paths = write_results(summaries, tmp_path, spec.name, spec.target_accuracy)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 4 and rows[2]["strategy"] == "fedavg" and rows[2]["attack_success_rate"] == "0.5"
    assert rows[0]["status"] == "failed" and rows[0]["error"] == "RuntimeError: boom"
    table = paths["table"].read_text()
    assert "| strategy=fedavg | 1 | 60.00 |" in table
    assert "## Mean ± std across seeds" in table and "1/2 reached, mean 2.0" in table
    assert "55.00 ± 7.07" in table  # final accuracy of seeds 0 and 1 (sample std)
    assert "## Failed runs" in table and "strategy=fedsgd (seed 0): RuntimeError: boom" in table
    for key in ("accuracy plot", "fairness plot", "target plot"):
        assert paths[key].stat().st_size > 0, key


# --------------------------------------------------------------------------- the command


def test_dry_run_prints_the_runs_and_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module, "run_simulation", lambda config: pytest.fail("trained in a dry run"))
    cfg = tmp_path / "e.toml"
    cfg.write_text('[base]\ndataset = "digits"\nrounds = 2\n[grid]\nstrategy = ["fedavg", "fedsgd"]\nseed = [0, 1]\n')
    result = CliRunner().invoke(app, ["experiment", str(cfg), "--dry-run", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "4 run(s)" in result.output and "strategy=fedsgd  seed 1" in result.output
    assert "nothing trained" in _words(result.output) and not (tmp_path / "out").exists()


def test_only_selects_runs_by_label_and_names_the_labels_on_a_typo(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module, "run_simulation", lambda config: pytest.fail("trained in a dry run"))
    cfg = tmp_path / "e.toml"
    cfg.write_text('[base]\ndataset = "digits"\nrounds = 2\n[grid]\nstrategy = ["fedavg", "fedsgd"]\nseed = [0, 1]\n')
    result = CliRunner().invoke(app, ["experiment", str(cfg), "--dry-run", "--only", "strategy=fedsgd"])
    assert result.exit_code == 0, result.output
    assert "2 run(s)" in result.output and "strategy=fedavg" not in result.output
    result = CliRunner().invoke(app, ["experiment", str(cfg), "--dry-run", "--only", "strategy=sgd"])
    assert result.exit_code == 2 and "labels are strategy=fedavg, strategy=fedsgd" in _words(result.output)


def test_bad_value_exits_2_before_training(tmp_path):
    cfg = tmp_path / "e.toml"
    cfg.write_text('[base]\ndataset = "digits"\n[grid]\nstrategy = ["fedavg", "nope"]\n')
    result = CliRunner().invoke(app, ["experiment", str(cfg), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "unknown strategy 'nope'" in _words(result.output)
    assert not (tmp_path / "out").exists()


def test_a_failed_run_makes_the_command_exit_1(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module, "run_simulation", _fake_run_simulation)
    cfg = tmp_path / "e.toml"
    cfg.write_text('[base]\ndataset = "digits"\n[grid]\nstrategy = ["fedavg", "fedsgd"]\n')
    result = CliRunner().invoke(app, ["experiment", str(cfg), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "1 run(s) failed" in _words(result.output)
    assert (tmp_path / "out" / "results.csv").is_file()


def test_experiment_command_end_to_end(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text('name = "tiny"\ntarget_accuracy = 0.3\n'
                   '[base]\ndataset = "digits"\nnum_clients = 3\nrounds = 2\nlocal_epochs = 1\n'
                   'train_limit = 300\nfraction_evaluate = 1.0\n'
                   '[grid]\nstrategy = ["fedavg", "fedsgd"]\n')
    out = tmp_path / "out"
    proc = subprocess.run([INSITU, "experiment", str(cfg), "-o", str(out)], check=False, capture_output=True,
                          text=True, timeout=300, env={"COLUMNS": "200", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[1/2] strategy=fedavg  seed 0  final accuracy" in proc.stdout
    assert "[2/2] strategy=fedsgd" in proc.stdout and "| run | seed |" in proc.stdout
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["label"] for r in rows] == ["strategy=fedavg", "strategy=fedsgd"]
    assert all(r["status"] == "ok" and r["fairness_clients"] == "3" for r in rows)
    assert "| strategy=fedavg | 0 |" in (out / "results.md").read_text()
    for name in ("accuracy_per_round.png", "fairness.png", "rounds_to_target.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "runs").glob("*/history.json"))) == 2
