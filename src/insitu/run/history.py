"""Per-round history of a run, and its JSON/CSV forms."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Evaluation:
    """A loss and metrics (e.g. accuracy) from one kind of evaluation."""

    loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    num_examples: int | None = None

    @property
    def accuracy(self) -> float | None:
        return self.metrics.get("accuracy")


@dataclass
class RoundRecord:
    """Everything the loop learned in one round."""

    round: int
    status: str = "ok"  # "ok" or "failed"
    error: str | None = None
    selected: list[str] = field(default_factory=list)
    num_results: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    fit_metrics: dict[str, float] = field(default_factory=dict)
    clients: dict[str, dict[str, float]] = field(default_factory=dict)
    federated: Evaluation | None = None
    centralized: Evaluation | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # Under central DP (without dp_record_client_metrics): selected, num_results, failures, clients,
    # client fit metrics, federated evaluation and timings were not recorded, as epsilon does not cover them.
    withheld: bool = False

    @property
    def headline(self) -> Evaluation | None:
        """The evaluation to report: centralized if the server has a test set, else federated."""
        return self.centralized or self.federated

    @property
    def loss(self) -> float | None:
        return self.headline.loss if self.headline else None

    @property
    def accuracy(self) -> float | None:
        return self.headline.accuracy if self.headline else None


@dataclass
class History:
    """The list of rounds, plus the evaluation of the initial model (round 0) if one was made."""

    rounds: list[RoundRecord] = field(default_factory=list)
    initial: Evaluation | None = None
    stopped: str | None = None  # why the run ended before its last round (e.g. privacy budget)

    @property
    def final_accuracy(self) -> float | None:
        ok = [r for r in self.rounds if r.accuracy is not None]
        return ok[-1].accuracy if ok else None

    @property
    def failed_rounds(self) -> list[int]:
        return [r.round for r in self.rounds if r.status != "ok"]

    def to_dict(self) -> dict[str, Any]:
        return {"initial": asdict(self.initial) if self.initial else None, "rounds": [asdict(r) for r in self.rounds],
                "stopped": self.stopped}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        def evaluation(d: dict[str, Any] | None) -> Evaluation | None:
            return Evaluation(**d) if d else None

        rounds = []
        for r in data.get("rounds", []):
            r = dict(r)
            r["federated"], r["centralized"] = evaluation(r.get("federated")), evaluation(r.get("centralized"))
            rounds.append(RoundRecord(**r))
        return cls(rounds, evaluation(data.get("initial")), data.get("stopped"))

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def save_csv(self, path: str | Path) -> None:
        """One row per round: status, counts, headline and both evaluations, fit metrics, timings."""
        fit_keys = sorted({k for r in self.rounds for k in r.fit_metrics})
        timing_keys = sorted({k for r in self.rounds for k in r.timings})
        header = ["round", "status", "selected", "results", "failures", "loss", "accuracy",
                  "centralized_loss", "centralized_accuracy", "federated_loss", "federated_accuracy"]
        header += [f"fit_{k}" for k in fit_keys] + [f"time_{k}" for k in timing_keys]
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for r in self.rounds:
                row: list[Any] = [r.round, r.status, len(r.selected), r.num_results, len(r.failures), r.loss, r.accuracy]
                for ev in (r.centralized, r.federated):
                    row += [ev.loss, ev.accuracy] if ev else [None, None]
                row += [r.fit_metrics.get(k) for k in fit_keys] + [r.timings.get(k) for k in timing_keys]
                writer.writerow(["" if v is None else v for v in row])
