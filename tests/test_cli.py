"""End-to-end: the real ``insitu`` console command in a subprocess."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from insitu.models import TwoNN

INSITU = shutil.which("insitu") or str(Path(sys.executable).parent / "insitu")


def run(*args: str, cwd: Path | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([INSITU, *args], check=False, capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={"COLUMNS": "200", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_demo_with_no_arguments(tmp_path):
    proc = run("simulate", cwd=tmp_path)
    assert "Round 10/10" in proc.stdout
    final = json.loads(next(tmp_path.glob("insitu-runs/*/history.json")).read_text())["rounds"][-1]
    assert final["centralized"]["metrics"]["accuracy"] > 0.90
    assert "Outputs in insitu-runs/simulate-" in proc.stdout


def test_mnist_subset_end_to_end_outputs_and_evaluate(tmp_path, mnist_dir):
    out = tmp_path / "run"
    proc = run("simulate", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--model", "2nn", "--clients", "4",
               "--rounds", "2", "--partition", "dirichlet", "--alpha", "0.5", "--train-limit", "3000", "--lr", "0.05",
               "--fraction", "0.5", "--fraction-evaluate", "1.0", "--show-partition", "-o", str(out))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("Round ")]
    assert len(lines) == 2 and "accuracy" in lines[1] and "(2 clients" in lines[1]
    assert "total" in proc.stdout  # the label histogram
    for name in ("model.pt", "history.json", "history.csv", "plot.png", "config.json"):
        assert (out / name).stat().st_size > 0, name
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert history["rounds"][1]["federated"]["num_examples"] == 10000
    assert (out / "history.csv").read_text().splitlines()[0].startswith("round,status")
    accuracy = history["rounds"][-1]["centralized"]["metrics"]["accuracy"]
    assert accuracy > 0.6  # from ~10% before training
    # the seeds' test_global.py way: plain torch.load + load_state_dict
    model = TwoNN()
    model.load_state_dict(torch.load(out / "model.pt"))
    ev = run("evaluate", str(out / "model.pt"), "--dataset", "mnist", "--data-dir", str(mnist_dir))
    assert "2nn on mnist test (10000 examples)" in ev.stdout
    assert f"accuracy {100 * accuracy:.2f}%" in ev.stdout


def test_toml_config_and_flag_override(tmp_path):
    cfg = tmp_path / "fl.toml"
    cfg.write_text('[simulate]\ndataset = "breast-cancer"\nclients = 3\nrounds = 4\nmodel = "logreg"\n')
    out = tmp_path / "o"
    proc = run("simulate", "--config", str(cfg), "--rounds", "2", "-o", str(out))
    assert "Round 2/2" in proc.stdout and "breast-cancer" in proc.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_clients"] == 3 and saved["rounds"] == 2 and saved["model"] == "logreg"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "cifar"], "unknown dataset"),
        (["--partition", "zipf"], "choose one of iid, dirichlet, shards, quantity"),
        (["--model", "resnet"], "choose one of simple-cnn, 2nn, logreg, mlp"),
        (["--partition", "dirichlet", "--alpha", "0"], "alpha must be > 0"),
        (["--clients", "5000"], "more clients"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent/insitu"], "/nonexistent/insitu"),
    ],
)
def test_bad_input_fails_before_training_with_a_clear_message(args, message, tmp_path):
    proc = run("simulate", *args, "-o", str(tmp_path / "x"), ok=False)
    assert proc.returncode == 2
    text = " ".join((proc.stdout + proc.stderr).split())
    assert message in text
    assert "Round" not in proc.stdout


def test_evaluate_reports_missing_model(tmp_path):
    proc = run("evaluate", str(tmp_path / "nope.pt"), ok=False)
    assert proc.returncode == 2 and "no model file" in proc.stderr


def test_a_runs_config_json_reproduces_it_bit_for_bit(tmp_path):
    first = tmp_path / "first"
    run("simulate", "--dataset", "breast-cancer", "--clients", "3", "--rounds", "2", "--fraction", "0.7",
        "--local-epochs", "1", "--seed", "3", "-o", str(first))
    again = tmp_path / "again"
    run("simulate", "--config", str(first / "config.json"), "-o", str(again))
    assert (again / "config.json").read_text() == (first / "config.json").read_text()

    def accuracies(out: Path) -> list[float]:
        rounds = json.loads((out / "history.json").read_text())["rounds"]
        return [r["centralized"]["metrics"]["accuracy"] for r in rounds]

    assert len(accuracies(first)) == 2 and accuracies(again) == accuracies(first)  # floats compared exactly


def test_every_setting_is_a_flag_and_unknown_ones_are_named(tmp_path):
    out = tmp_path / "o"
    proc = run("simulate", "--dataset", "breast-cancer", "--clients", "3", "--rounds", "1", "--mode", "sync",
               "--speed-sigma", "0.5", "--dp-accountant", "rdp", "--lr-step-every", "3", "-o", str(out))
    saved = json.loads((out / "config.json").read_text())
    assert saved["speed_sigma"] == 0.5 and saved["lr_step_every"] == 3 and saved["aggregator_options"] == {}
    assert "Round 1/1" in proc.stdout
    typo = run("simulate", "--speed-sigmaa", "0.5", ok=False)
    assert typo.returncode == 2 and "--speed-sigma" in typo.stderr
