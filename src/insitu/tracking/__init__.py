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

import contextlib
import logging
import math
import os
import re
from collections.abc import Callable, Container, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from insitu.run.history import RoundRecord

__all__ = ["MLflowTracker", "TensorBoardTracker", "Tracker", "Trackers", "round_scalars", "trackers"]

Tracker = Callable[[RoundRecord, Any, Any], None]

log = logging.getLogger("insitu.tracking")

MAX_NAME_LENGTH = 250  # MLflow's longest metric name
MAX_METRICS_PER_BATCH = 1000  # MLflow's most metrics in one log_batch call
_DISALLOWED = re.compile(r"[^A-Za-z0-9_\-. /]")  # MLflow's metric-name characters (its colon is not on Windows)


def metric_name(name: str, taken: Container[str] = ()) -> str:
    """``name`` as a metric name every tracker accepts (metric names come from clients): characters other
    than ASCII letters, digits, ``_-. /`` become ``_``; repeated, leading and trailing ``/`` go, as do ``.`` and
    ``..`` path segments; at most 250 characters; a suffix ``_2``, ``_3``, ... when it is among ``taken``."""
    base = _normalized(_DISALLOWED.sub("_", name)[:MAX_NAME_LENGTH])
    out, number = base, 1
    while out in taken:
        number += 1
        suffix = f"_{number}"
        out = _normalized(base[:MAX_NAME_LENGTH - len(suffix)]) + suffix
    return out


def _normalized(name: str) -> str:
    """No empty, ``.`` or ``..`` path segments, and no leading ``..`` (MLflow refuses names that a path
    normalisation would change)."""
    parts = [part if part not in (".", "..") else "_" * len(part) for part in name.split("/") if part]
    out = "/".join(parts)
    if out.startswith(".."):
        out = "_" + out[1:]
    return out or "_"


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """The round's numbers by name: ``accuracy``/``loss`` (the headline evaluation), ``centralized/...`` and
    ``federated/...`` (each evaluation's loss and metrics), ``fit/...`` (the aggregated fit metrics, e.g.
    ``fit/epsilon``), ``time/...`` (the timings, seconds) and ``participation/...`` (clients selected, results,
    failures). Non-finite and missing values are left out; a failed round has only its participation. Names
    pass through :func:`metric_name` (clients name their metrics: a name a tracker would refuse must not
    end the run)."""
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
    scalars: dict[str, float] = {}
    taken = _PathNames()
    for name, value in out.items():
        if isinstance(value, int | float) and math.isfinite(value):
            scalars[taken.add(metric_name(name, taken))] = float(value)
    return scalars


class _PathNames:
    """Metric names in use, where a name also takes every folder above it: MLflow's file store keeps
    ``a/b`` as a file ``b`` in a folder ``a``, so ``a`` and ``a/b`` cannot both be metrics."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.folders: set[str] = set()

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        parts = name.split("/")
        above = ("/".join(parts[:i]) for i in range(1, len(parts)))
        return name in self.names or name in self.folders or any(folder in self.names for folder in above)

    def add(self, name: str) -> str:
        parts = name.split("/")
        self.names.add(name)
        self.folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        return name


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
        file_store = not uri
        if file_store:
            uri = (Path(default_dir).resolve() / "mlruns").as_uri()
        self.tracking_uri = uri
        # MLflow 3: a local file store is opt-in, checked when the (cached) store is built: allowed for that only.
        with _environment("MLFLOW_ALLOW_FILE_STORE", "true" if file_store else None):
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
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):  # MLflow refuses larger batches
            self._client.log_batch(self.run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])

    def close(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> MLflowTracker:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, _exc: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """``$name`` set to ``value`` (unless already set) for the block only; nothing when ``value`` is None."""
    if value is None or name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _millis() -> int:
    import time

    return int(time.time() * 1000)


class Trackers:
    """The trackers a command's flags asked for, as one ``on_round`` observer and one context manager.

    Tracking never stops or fails a run: a tracker that raises (a server gone, a value it refuses) is
    reported once, as a warning with the error, and the run and the other trackers go on."""

    def __init__(self, members: list[TensorBoardTracker | MLflowTracker]) -> None:
        self.members = members
        self._warned: set[int] = set()

    def __call__(self, record: RoundRecord, parameters: Any = None, state: Any = None) -> None:
        for member in self.members:
            try:
                member(record, parameters, state)
            except Exception as error:  # noqa: BLE001 - tracking is a side channel: the run goes on
                self._warn(member, f"round {record.round}", error)

    def _warn(self, member: object, when: str, error: Exception) -> None:
        if id(member) not in self._warned:
            self._warned.add(id(member))
            log.warning("%s failed (%s: %s: %s); the run goes on, and further failures of this tracker are not "
                        "reported", type(member).__name__, when, type(error).__name__, error)

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
            try:
                member.__exit__(exc_type, exc, tb)
            except Exception as error:  # noqa: BLE001 - closing a tracker must not fail a finished run
                self._warn(member, "closing", error)


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
