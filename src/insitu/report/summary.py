"""A run's history boiled down to what the dashboard and the HTML report show.

One place computes the per-round rows, the per-client table (participation, failures with their
reasons), fairness across clients and the privacy spent, so the live dashboard, ``insitu dashboard
RUN_DIR`` and ``insitu report`` agree number for number. Everything returned is plain JSON (no NaN or
infinity: those become None, which JSON.parse accepts).
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from insitu.run.history import Evaluation, History, RoundRecord

MAX_FAILURES_PER_ROUND = 50  # a round's failures shown in full up to this many (the count is always exact)
MAX_CLIENT_ROWS = 1000  # the per-client table's rows (the most active clients first beyond this)
MAX_REASON_CHARS = 500  # a failure reason's characters kept (clients write them: they can be huge)
# Reasons a task failed without the client's result ever being judged: the systems model or the network.
DROP_MARKERS = ("ClientDroppedOut", "StragglerDropped", "ClientDroppedError", "RoundDeadlineError", "WorkerLost")


def finite(value: object) -> float | None:
    """``value`` as a float, or None when it is missing, not a number, NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def clipped(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to ``limit`` characters, ending in an ellipsis when cut (reasons come from clients and are
    copied into every round row, the client table and each page's feed)."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def accounts_privacy(config: Mapping[str, Any]) -> bool:
    """Whether the run's ``epsilon`` is an accountant's: the server's under central or distributed DP
    (``dp_clip`` > 0), or under local DP (``local_dp_noise`` > 0) the clients' own (insitu's client in a
    simulation). Without either, a round's ``epsilon`` or ``clip_norm`` could only be a client's metric."""
    clip, local = finite(config.get("dp_clip")), finite(config.get("local_dp_noise"))
    return (clip is not None and clip > 0) or (local is not None and local > 0)


def plain(value: Any) -> Any:
    """``value`` (dicts, lists, numbers) with NaN and infinity as None, as strict JSON needs."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def failure_kind(reason: str) -> str:
    """``dropped`` (the client or its connection went away, or ran out of time), ``failed`` (its code raised)
    or ``rejected`` (its result arrived and failed validation)."""
    if any(marker in reason for marker in DROP_MARKERS):
        return "dropped"
    if reason.startswith(("fit failed:", "evaluate failed:")):
        return "failed"
    return "rejected"


def fairness_of(record: RoundRecord) -> dict[str, Any] | None:
    """The spread of per-client accuracies one round's federated evaluation measured (mean, worst 10%, std),
    computed by the experiments' own :func:`~insitu.experiments.runner.fairness`; None when no client evaluated."""
    from insitu.experiments.runner import fairness

    found = fairness(History([record]))
    if found is None:
        return None
    return {"round": found.round, "clients": found.n_clients, "mean": finite(found.mean),
            "worst10": finite(found.worst10), "std": finite(found.std),
            "accuracies": [finite(a) for a in found.accuracies]}


def evaluation_dict(ev: Evaluation | None) -> dict[str, Any] | None:
    """An evaluation's loss, accuracy and example count (None when there was none)."""
    if ev is None:
        return None
    return {"loss": finite(ev.loss), "accuracy": finite(ev.accuracy), "examples": ev.num_examples}


def round_row(record: RoundRecord, fair: dict[str, Any] | None | bool = False, *,
              dp: bool = False) -> dict[str, Any]:
    """One round as the dashboard and report show it: headline numbers, counts, failures, timings, fairness
    (``fair``: the round's :func:`fairness_of` when the caller has it already).

    ``dp``: the run accounts privacy (:func:`accounts_privacy` of its config). Only then are the fit metrics'
    ``epsilon`` and ``clip_norm`` shown: without DP a round's fit metrics are the clients' average, and a
    client reporting ``epsilon`` would make a run without DP look private. Reasons are cut to 500 characters."""
    failures = [{"client": clipped(str(f.get("client", ""))), "stage": clipped(str(f.get("stage", ""))),
                 "reason": clipped(str(f.get("reason", ""))), "kind": failure_kind(str(f.get("reason", "")))}
                for f in record.failures[:MAX_FAILURES_PER_ROUND]]
    if fair is False:
        fair = fairness_of(record)
    if isinstance(fair, dict):
        fair = {k: v for k, v in fair.items() if k != "accuracies"}
    return {
        "round": record.round, "status": record.status, "error": record.error,
        "loss": finite(record.loss), "accuracy": finite(record.accuracy),
        "centralized": evaluation_dict(record.centralized), "federated": evaluation_dict(record.federated),
        "epsilon": finite(record.fit_metrics.get("epsilon")) if dp else None,
        "clip_norm": finite(record.fit_metrics.get("clip_norm")) if dp else None,
        "staleness": finite(record.fit_metrics.get("staleness_mean")),
        "selected": len(record.selected), "results": record.num_results,
        "num_failures": len(record.failures), "failures": failures,
        "failure_counts": _count(failure_kind(str(f.get("reason", ""))) for f in record.failures),
        "timings": {k: finite(v) for k, v in record.timings.items()},
        "fairness": fair, "withheld": record.withheld,
    }


def _count(kinds: Iterable[str]) -> dict[str, int]:
    counts = {"failed": 0, "dropped": 0, "rejected": 0}
    for kind in kinds:
        counts[kind] += 1
    return counts


@dataclass
class ClientStats:
    """One client's participation over the rounds seen so far."""

    selected: int = 0
    finished: int = 0
    failed: int = 0
    dropped: int = 0
    rejected: int = 0
    last_round: int = 0
    last_problem: str | None = None  # the latest failure's stage and reason
    accuracy: float | None = None  # its latest federated-evaluation accuracy
    extra: dict[str, float] = field(default_factory=dict)


class ClientTally:
    """Per-client counts, updated one round at a time (the dashboard adds each round as it ends)."""

    def __init__(self) -> None:
        self.clients: dict[str, ClientStats] = {}

    def add(self, record: RoundRecord) -> None:
        """Count ``record``'s selected clients, their fit results and every failure with its reason."""
        fit_problems: set[str] = set()
        for f in record.failures:
            cid, stage, reason = str(f.get("client", "")), str(f.get("stage", "")), str(f.get("reason", ""))
            stats = self.clients.setdefault(cid, ClientStats())
            kind = failure_kind(reason)
            setattr(stats, kind, getattr(stats, kind) + 1)
            stats.last_problem = f"round {record.round}, {clipped(stage, 50)}: {clipped(reason)}"
            stats.last_round = max(stats.last_round, record.round)
            if stage != "evaluate":
                fit_problems.add(cid)
        for cid in record.selected:
            stats = self.clients.setdefault(cid, ClientStats())
            stats.selected += 1
            stats.last_round = max(stats.last_round, record.round)
            if cid not in fit_problems:
                stats.finished += 1
        for cid, metrics in record.clients.items():
            accuracy = finite(metrics.get("eval_accuracy"))
            if accuracy is not None:
                stats = self.clients.setdefault(cid, ClientStats())
                stats.accuracy = accuracy
                stats.last_round = max(stats.last_round, record.round)

    def rows(self, limit: int = MAX_CLIENT_ROWS) -> list[dict[str, Any]]:
        """One dict per client, in natural id order; beyond ``limit`` the most selected clients are kept."""
        from insitu.engines.grpc_pool import natural_order

        ids: list[str] = list(self.clients)
        if len(ids) > limit:  # O(n log limit), not a sort of every client ever seen
            ids = heapq.nlargest(limit, ids, key=lambda c: (self.clients[c].selected, self.clients[c].failed))
        ids = natural_order(ids)
        rows = []
        for cid in ids:
            s = self.clients[cid]
            rows.append({"client": cid, "selected": s.selected, "finished": s.finished, "failed": s.failed,
                         "dropped": s.dropped, "rejected": s.rejected, "last_round": s.last_round,
                         "last_problem": s.last_problem, "accuracy": s.accuracy})
        return rows


def privacy_summary(config: Mapping[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What privacy the run spent: central/distributed DP (epsilon after the last round, delta, noise
    multiplier, clip) and local DP's settings; None when no DP ran."""
    summary: dict[str, Any] = {}
    if finite(config.get("dp_clip")) and float(config["dp_clip"]) > 0:
        epsilons = [r["epsilon"] for r in rounds if r.get("epsilon") is not None]
        clips = [r["clip_norm"] for r in rounds if r.get("clip_norm") is not None]
        summary.update(mode=str(config.get("dp_mode", "central")), epsilon=epsilons[-1] if epsilons else None,
                       delta=finite(config.get("dp_delta")), noise_multiplier=finite(config.get("dp_noise")),
                       clip=finite(config.get("dp_clip")), final_clip=clips[-1] if clips else None,
                       adaptive_clip=bool(config.get("dp_adaptive_clip")),
                       target_epsilon=finite(config.get("dp_target_epsilon")) or None,
                       accountant=str(config.get("dp_accountant", "")))
    if finite(config.get("local_dp_noise")) and float(config["local_dp_noise"]) > 0:
        summary["local"] = {"noise_multiplier": finite(config.get("local_dp_noise")),
                            "clip": finite(config.get("local_dp_clip")), "delta": finite(config.get("dp_delta")),
                            "target_epsilon": finite(config.get("local_dp_target_epsilon")) or None}
    return summary or None


def config_items(config: Mapping[str, Any]) -> list[list[str]]:
    """The settings as [key, value-as-text] pairs, in the file's order."""
    return [[str(k), v if isinstance(v, str) else json.dumps(v, allow_nan=True, default=str)] for k, v in config.items()]


def run_view(history: History, config: Mapping[str, Any], *, title: str = "", mode: str = "finished run",
             done: bool = True) -> dict[str, Any]:
    """The whole view of a run: everything the dashboard and the report display, as plain JSON."""
    tally = ClientTally()
    for record in history.rounds:
        tally.add(record)
    dp = accounts_privacy(config)
    rows = [round_row(r, dp=dp) for r in history.rounds]
    latest = next((f for f in (fairness_of(r) for r in reversed(history.rounds)) if f is not None), None)
    return {"title": title or default_title(config), "mode": mode, "num_rounds": plain(config.get("rounds")),
            "initial": evaluation_dict(history.initial), "rounds": rows, "clients": tally.rows(),
            "num_clients_seen": len(tally.clients), "fairness": latest, "privacy": privacy_summary(config, rows),
            "config": config_items(config), "stopped": history.stopped, "done": done, "live": None}


def default_title(config: Mapping[str, Any]) -> str:
    """``fedavg on digits (mlp, 10 clients)`` from a run's settings."""
    if not config:
        return "insitu run"
    return (f"{config.get('strategy', '?')} on {config.get('dataset', '?')} ({config.get('model', '?')}, "
            f"{config.get('num_clients', '?')} clients)")


def load_run(run_dir: Path) -> tuple[History, dict[str, Any]]:
    """A finished run's history.json and config.json (plain JSON: nothing is unpickled), with errors that
    name the missing or broken file."""
    history_path, config_path = run_dir / "history.json", run_dir / "config.json"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder: give the run's output folder (simulate --output-dir)")
    if not history_path.is_file():
        raise FileNotFoundError(f"no history.json in {run_dir}: give the folder a run wrote (it holds history.json "
                                "and config.json)")
    try:
        data = json.loads(history_path.read_text())
        history = History.from_dict(data)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"{history_path} is not a run history written by insitu: {error}") from None
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            loaded = json.loads(config_path.read_text())
        except ValueError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path} must hold a JSON object of settings, got a {type(loaded).__name__}")
        config = loaded
    return history, config
