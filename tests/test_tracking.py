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


HOSTILE_NAMES = ["f1@k", "../../etc/x", "a//b/", "/lead", "./x/.", "..", "", "x" * 300, "f1_k", "naïve:σ", "tab\tand\nline"]


def _mlflow_accepts(name: str) -> bool:
    validation = pytest.importorskip("mlflow.utils.validation")
    try:
        validation._validate_metric_name(name)
    except Exception:  # noqa: BLE001 - MlflowException
        return False
    return len(name) <= validation.MAX_ENTITY_KEY_LENGTH


def test_client_named_metrics_become_names_every_tracker_accepts_and_stay_distinct() -> None:
    assert not _mlflow_accepts("fit/f1@k") and not _mlflow_accepts("fit/a//b/")  # what reached MLflow before
    record = RoundRecord(round=1, selected=["a"], num_results=1,
                         fit_metrics={name: float(i) for i, name in enumerate(HOSTILE_NAMES)},
                         federated=Evaluation(0.5, {"f1@k": 0.25}, 10))
    scalars = round_scalars(record)
    fit = {name: value for name, value in scalars.items() if name.startswith("fit")}  # "fit/" + "" is "fit"
    assert len(fit) == len(HOSTILE_NAMES) and sorted(fit.values()) == [float(i) for i in range(len(HOSTILE_NAMES))]
    assert fit["fit/f1_k"] == 0.0 and fit["fit/f1_k_2"] == 8.0  # the first keeps the name; the second is told apart
    assert fit["fit/a/b"] == 2.0 and fit["fit/lead"] == 3.0 and scalars["federated/f1_k"] == 0.25
    assert all(_mlflow_accepts(name) for name in scalars), [n for n in scalars if not _mlflow_accepts(n)]


def test_mlflow_logs_over_a_thousand_hostile_metrics_and_leaves_the_environment_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from insitu.tracking import MLflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    metrics = {f"m@{i}": float(i) for i in range(1100)} | {name: 1.0 for name in HOSTILE_NAMES}
    with MLflowTracker(default_dir=tmp_path) as tracker:
        assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # allowed for building the store only
        tracker(RoundRecord(round=1, selected=["a"], num_results=1, fit_metrics=metrics))
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for reading the file store back
        logged = tracker._client.get_run(tracker.run_id).data.metrics
    assert len(logged) == len(metrics) + 3  # and the three participation counts
    assert logged["fit/m_1099"] == 1099.0 and logged["fit/f1_k"] == 1.0


class Raising:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, record: RoundRecord, _parameters: object = None, _state: object = None) -> None:
        self.calls += 1
        raise RuntimeError("tracking server gone")

    def __exit__(self, *_exc: object) -> None:
        raise RuntimeError("cannot close")


class Recording:
    def __init__(self) -> None:
        self.rounds: list[int] = []
        self.closed = False

    def __call__(self, record: RoundRecord, _parameters: object = None, _state: object = None) -> None:
        self.rounds.append(record.round)

    def __exit__(self, *_exc: object) -> None:
        self.closed = True


def test_a_tracker_that_raises_is_reported_once_and_the_run_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    from insitu.tracking import Trackers

    raising, recording = Raising(), Recording()
    seen: list[int] = []
    with caplog.at_level("WARNING", logger="insitu.tracking"), Trackers([raising, recording]) as both:  # type: ignore[list-item]
        observer = both.also(lambda record, _p, _s: seen.append(record.round))
        for round_ in (1, 2, 3):
            observer(RoundRecord(round=round_, selected=["a"]), None, None)
    assert seen == recording.rounds == [1, 2, 3] and raising.calls == 3 and recording.closed
    warnings = [r.getMessage() for r in caplog.records if r.name == "insitu.tracking"]
    assert len(warnings) == 1 and "tracking server gone" in warnings[0] and "Raising" in warnings[0]
