"""insitu.tracking: a short run's per-round numbers written to TensorBoard and MLflow and read back equal to
history.json."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from insitu.run.history import Evaluation, History, RoundRecord
from insitu.tracking import round_scalars, trackers


def test_round_scalars_flattens_a_record_as_history_holds_it() -> None:
    record = RoundRecord(round=3, selected=["a", "b", "c"], num_results=2, failures=[{"client": "c"}],
                         fit_metrics={"train_loss": 0.5, "epsilon": 1.25, "bad": math.nan},
                         federated=Evaluation(0.7, {"accuracy": 0.6}, 40),
                         centralized=Evaluation(0.4, {"accuracy": 0.9}, 100), timings={"fit_s": 2.0})
    assert round_scalars(record) == {
        "participation/selected": 3, "participation/results": 2, "participation/failures": 1,
        "centralized/loss": 0.4, "centralized/accuracy": 0.9, "federated/loss": 0.7, "federated/accuracy": 0.6,
        "loss": 0.4, "accuracy": 0.9,  # the headline: centralized when there is one
        "fit/train_loss": 0.5, "fit/epsilon": 1.25, "time/fit_s": 2.0}  # NaN left out
    failed = RoundRecord(round=4, status="failed", selected=["a"])
    assert round_scalars(failed) == {"participation/selected": 1, "participation/results": 0,
                                     "participation/failures": 0}


def test_missing_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(ImportError, match=r"insitu\[mlflow\]"):
        trackers(tensorboard=None, mlflow=True, mlflow_uri=None, run_dir=tmp_path)
    assert trackers(tensorboard=None, mlflow=False, mlflow_uri=None, run_dir=tmp_path).members == []


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, History]:
    """`insitu simulate` for 3 small rounds with --tensorboard and --mlflow, whichever is installed (central DP,
    so epsilon is logged). Both are in the test extra, so under CI neither test skips (conftest fails a skip)."""
    tracking = [["--tensorboard", "TB"]] if find_spec("tensorboard") else []
    tracking += [["--mlflow"]] if find_spec("mlflow") else []
    if not tracking:
        pytest.skip("neither tensorboard nor mlflow is installed")
    out = tmp_path_factory.mktemp("tracked")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "insitu.cli.main", "simulate", "--dataset", "digits", "--model", "logreg",
               "--rounds", "3", "--num-clients", "4", "--fraction-evaluate", "0.5", "--dp-clip", "1.0",
               "--dp-noise", "0.5", "--dp-record-client-metrics", "--output-dir", str(out / "run"),
               *[str(out / "tb") if arg == "TB" else arg for flags in tracking for arg in flags]]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    history = History.from_dict(json.loads((out / "run" / "history.json").read_text()))
    assert len(history.rounds) == 3
    return out, history


def test_tensorboard_scalars_equal_history(tracked_run: tuple[Path, History]) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, history = tracked_run
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    expected = {r.round: round_scalars(r) for r in history.rounds}
    names = set(events.Tags()["scalars"])
    assert {"accuracy", "fit/epsilon", "federated/accuracy", "participation/selected", "time/fit_s"} <= names
    assert names == {k for scalars in expected.values() for k in scalars}
    for name in names:
        logged = {e.step: e.value for e in events.Scalars(name)}
        want = {step: scalars[name] for step, scalars in expected.items() if name in scalars}
        assert logged.keys() == want.keys()
        for step, value in want.items():  # TensorBoard stores float32
            assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-6), (name, step)
    epsilons = [e.value for e in events.Scalars("fit/epsilon")]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0  # privacy spent only grows


def test_mlflow_metrics_and_params_equal_history(tracked_run: tuple[Path, History]) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out, history = tracked_run
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when told
    client = MlflowClient(tracking_uri=(out / "run" / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("insitu")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["rounds"] == "3" and run.data.params["model"] == "logreg"
    for name in ("accuracy", "loss", "fit/epsilon", "federated/accuracy", "participation/results"):
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert logged == pytest.approx({r.round: round_scalars(r)[name] for r in history.rounds}), name
