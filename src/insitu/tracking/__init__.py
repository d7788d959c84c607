"""Experiment tracking: each round's numbers to TensorBoard or MLflow, as ``on_round`` observers.

:func:`round_scalars` flattens a :class:`~insitu.run.history.RoundRecord` into named numbers (the same ones
``history.json`` holds: accuracy and loss of each evaluation, the fit metrics such as ``epsilon``, the
timings, participation); :class:`TensorBoardTracker` and :class:`MLflowTracker` log them with the round as
the step. Both are optional extras, imported only when used (``pip install 'insitu[tensorboard]'`` /
``'insitu[mlflow]'``)::

    with TensorBoardTracker("runs/tb") as tb:
        experiment.run(on_round=tb)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from insitu.run.history import RoundRecord

__all__ = ["MLflowTracker", "TensorBoardTracker", "Tracker", "Trackers", "round_scalars", "trackers"]

Tracker = Callable[[RoundRecord, Any, Any], None]


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """The round's numbers by name: ``accuracy``/``loss`` (the headline evaluation), ``centralized/...`` and
    ``federated/...`` (each evaluation's loss and metrics), ``fit/...`` (the aggregated fit metrics, e.g.
    ``fit/epsilon``), ``time/...`` (the timings, seconds) and ``participation/...`` (clients selected, results,
    failures). Non-finite and missing values are left out; a failed round has only its participation."""
    out: dict[str, float] = {"participation/selected": len(record.selected),
                             "participation/results": record.num_results,
                             "participation/failures": len(record.failures)}
    for kind, evaluation in (("centralized", record.centralized), ("federated", record.federated)):
        if evaluation is not None:
            out[f"{kind}/loss"] = evaluation.loss
            out.update({f"{kind}/{k}": v for k, v in evaluation.metrics.items()})
    if record.loss is not None:
        out["loss"] = record.loss
    if record.accuracy is not None:
        out["accuracy"] = record.accuracy
    out.update({f"fit/{k}": v for k, v in record.fit_metrics.items()})
    out.update({f"time/{k}": v for k, v in record.timings.items()})
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float) and math.isfinite(v)}


class TensorBoardTracker:
    """Write every round's :func:`round_scalars` as TensorBoard scalars (step = round) into ``log_dir``."""

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            raise ImportError("--tensorboard needs TensorBoard: pip install 'insitu[tensorboard]'") from None
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def __call__(self, record: RoundRecord, _parameters: Any = None, _state: Any = None) -> None:
        for name, value in round_scalars(record).items():
            self._writer.add_scalar(name, value, global_step=record.round)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardTracker:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class MLflowTracker:
    """Log every round's :func:`round_scalars` to an MLflow run (step = round), and ``params`` (the run's
    settings) once.

    ``tracking_uri``: ``$MLFLOW_TRACKING_URI`` if set, else a local file store under ``default_dir``
    (``file:DIR/mlruns``, which MLflow 3 accepts only with ``MLFLOW_ALLOW_FILE_STORE=true``: set for that
    default here; a server or database URI needs nothing). The run ends ``FINISHED``, or ``FAILED`` when the
    block raised. Metric names keep their ``/`` (``fit/epsilon``).
    """

    def __init__(self, tracking_uri: str | None = None, *, default_dir: str | Path = ".", experiment: str = "insitu",
                 run_name: str | None = None, params: Mapping[str, Any] | None = None) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ImportError("--mlflow needs MLflow: pip install 'insitu[mlflow]'") from None
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
        if not uri:
            uri = (Path(default_dir).resolve() / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: a local file store is opt-in
        self.tracking_uri = uri
        self._client = MlflowClient(tracking_uri=uri)
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
        self.run_id: str = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        for key, value in (params or {}).items():
            self._client.log_param(self.run_id, key, str(value)[:6000])  # MLflow's longest parameter value

    def __call__(self, record: RoundRecord, _parameters: Any = None, _state: Any = None) -> None:
        from mlflow.entities import Metric

        now = _millis()
        metrics = [Metric(name, value, now, record.round) for name, value in round_scalars(record).items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> MLflowTracker:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, _exc: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")


def _millis() -> int:
    import time

    return int(time.time() * 1000)


class Trackers:
    """The trackers a command's flags asked for, as one ``on_round`` observer and one context manager."""

    def __init__(self, members: list[TensorBoardTracker | MLflowTracker]) -> None:
        self.members = members

    def __call__(self, record: RoundRecord, parameters: Any = None, state: Any = None) -> None:
        for member in self.members:
            member(record, parameters, state)

    def also(self, observer: Tracker) -> Tracker:
        """``observer`` followed by every tracker (for ``on_round``)."""
        def both(record: RoundRecord, parameters: Any, state: Any) -> None:
            observer(record, parameters, state)
            self(record, parameters, state)
        return both

    def __enter__(self) -> Trackers:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for member in self.members:
            member.__exit__(exc_type, exc, tb)


def trackers(*, tensorboard: str | Path | None, mlflow: bool, mlflow_uri: str | None, run_dir: str | Path,
             run_name: str | None = None, params: Mapping[str, Any] | None = None) -> Trackers:
    """The trackers a command's flags ask for (``--tensorboard DIR``, ``--mlflow [--mlflow-uri URI]``); an
    ``--mlflow-uri`` alone turns MLflow on. Missing packages raise ImportError naming the extra."""
    members: list[TensorBoardTracker | MLflowTracker] = []
    if tensorboard is not None:
        members.append(TensorBoardTracker(tensorboard))
    if mlflow or mlflow_uri:
        members.append(MLflowTracker(mlflow_uri, default_dir=run_dir, run_name=run_name, params=params))
    return Trackers(members)
