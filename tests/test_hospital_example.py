"""examples/hospitals: the data generator, the report, and the scenario end to end (keygen, a TLS server with
secure aggregation and central DP, five `insitu client --data` processes on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from importlib.util import find_spec
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hospitals"
HOSPITALS = [f"hospital_{k}" for k in range(1, 6)]


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"hospitals_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


def test_generator_is_deterministic_and_writes_each_hospitals_layout(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    make_data = _module("make_data")
    make_data.main(["--out", str(tmp_path / "a"), "--scale", "0.2", "--size", "16"])
    make_data.main(["--out", str(tmp_path / "b"), "--scale", "0.2", "--size", "16"])
    make_data.main(["--out", str(tmp_path / "c"), "--scale", "0.2", "--size", "16", "--seed", "1"])
    first = _digest(tmp_path / "a")
    assert first == _digest(tmp_path / "b")  # same seed, same bytes
    other = _digest(tmp_path / "c")  # another seed: other images, the same counts per folder
    assert Counter(str(Path(p).parent) for p in first) == Counter(str(Path(p).parent) for p in other)
    assert set(first.values()).isdisjoint(other.values())
    for site in make_data.HOSPITALS:  # train/ and test/ per hospital, one folder per class
        count = max(20, round(site.images * 0.2))
        files = [p for p in first if p.startswith(site.name + "/")]
        assert len(files) == count
        sick = sum("/pneumonia/" in p for p in files)
        assert sick == round(site.pneumonia * count)
        test = [p for p in files if p.startswith(f"{site.name}/test/")]
        assert len(test) == sum(round(max(10, round(0.25 * count)) * n / count) for n in (sick, count - sick))
    assert sum(p.startswith("reference/normal/") for p in first) == 20  # 200 x 0.2, half of each class
    with pytest.raises(SystemExit):  # never mixes two generations in one folder
        make_data.main(["--out", str(tmp_path / "a"), "--scale", "0.2", "--size", "16"])


def test_report_takes_each_hospitals_last_evaluation_and_the_worst() -> None:
    report = _module("report")
    def clients(*accuracies: float) -> dict[str, dict[str, float]]:
        return {f"h{i}": {"eval_accuracy": a, "eval_examples": 10 * (i + 1), "eval_loss": 1 - a}
                for i, a in enumerate(accuracies)}
    history = {"initial": {"loss": 0.7, "metrics": {"accuracy": 0.5}}, "rounds": [
        {"round": 1, "status": "ok", "clients": clients(0.5, 0.6, 0.7), "fit_metrics": {"epsilon": 1.0},
         "centralized": {"loss": 0.6, "metrics": {"accuracy": 0.55}}},
        {"round": 2, "status": "ok", "clients": clients(0.9, 0.6, 0.8), "fit_metrics": {"epsilon": 2.5},
         "centralized": {"loss": 0.5, "metrics": {"accuracy": 0.75}}},
        {"round": 3, "status": "failed", "clients": {}},
    ]}
    summary = report.summarize(history)
    assert summary["round"] == 2
    assert summary["worst"] == {"hospital": "h1", "accuracy": 0.6}
    assert summary["mean"] == pytest.approx((0.9 * 10 + 0.6 * 20 + 0.8 * 30) / 60)
    assert summary["worst_per_round"] == [0.5, 0.6]
    assert (summary["epsilon"], summary["reference_accuracy"], summary["initial_reference_accuracy"]) == (2.5, 0.75, 0.5)
    text = report.format_summary(summary)
    assert "worst           60.00%   (h1)" in text and "epsilon 2.5" in text
    with pytest.raises(ValueError, match="--fraction-evaluate 1"):  # e.g. DP without --dp-record-client-metrics
        report.summarize({"rounds": [{"round": 1, "status": "ok", "clients": {}}]})


def _run_example(work: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    bin_dir = Path(sys.executable).parent
    insitu = bin_dir / "insitu"
    if not insitu.exists() or shutil.which("bash") is None:
        pytest.skip("needs bash and the insitu command next to the interpreter")
    env = {**os.environ, "INSITU": str(insitu), "PYTHON": sys.executable, "WORK": str(work), **settings}
    return subprocess.run(["bash", str(EXAMPLE / "run.sh")], env=env, capture_output=True, text=True, timeout=900,
                          check=False)


def _check_run(work: Path, result: subprocess.CompletedProcess[str], rounds: int) -> dict[str, object]:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    history = json.loads((work / "server" / "history.json").read_text())
    config = json.loads((work / "server" / "config.json").read_text())
    assert config["secure_aggregation"] is True and config["dp_clip"] > 0 and config["model"] == "resnet18-w16"
    assert [r["status"] for r in history["rounds"]] == ["ok"] * rounds
    assert sorted(summary["hospitals"]) == HOSPITALS  # every hospital evaluated on its own test folder
    for name, hospital in summary["hospitals"].items():
        assert hospital["examples"] == len(list((work / "data" / name / "test").rglob("*.png")))
    worst = min(h["accuracy"] for h in summary["hospitals"].values())
    assert summary["worst"]["accuracy"] == worst and summary["epsilon"] > 0
    assert "worst" in result.stdout and "Per-hospital accuracy" in result.stdout
    return summary


def test_scenario_end_to_end_small(tmp_path: Path) -> None:
    """One round on tiny folders: the plumbing (TLS, signed clients, secure aggregation + DP, per-hospital
    evaluation, the report), not the accuracy."""
    pytest.importorskip("PIL")
    tensorboard = find_spec("tensorboard") is not None  # then the server also logs to TensorBoard
    extra = {"TENSORBOARD": str(tmp_path / "tb")} if tensorboard else {}
    result = _run_example(tmp_path, SCALE="0.1", ROUNDS="1", LOCAL_EPOCHS="1", IMAGE_SIZE="32", **extra)
    _check_run(tmp_path, result, rounds=1)
    if tensorboard:  # insitu server --tensorboard: the reference-set accuracy per round, as in history.json
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tb"))
        events.Reload()
        history = json.loads((tmp_path / "server" / "history.json").read_text())
        logged = {e.step: e.value for e in events.Scalars("centralized/accuracy")}
        assert logged == pytest.approx({r["round"]: r["centralized"]["metrics"]["accuracy"]
                                        for r in history["rounds"]})


@pytest.mark.slow
def test_scenario_full_learns_at_every_hospital(tmp_path: Path) -> None:
    """The README's run as it is: the global model must beat chance at every hospital."""
    pytest.importorskip("PIL")
    summary = _check_run(tmp_path, _run_example(tmp_path), rounds=15)
    hospitals = summary["hospitals"]
    assert isinstance(hospitals, dict)
    assert summary["mean"] >= 0.8  # type: ignore[operator]
    assert summary["worst"]["accuracy"] >= 0.65  # type: ignore[index]
