"""An experiment's results: a CSV row per run, Markdown tables (per run, per label across seeds), plots."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from insitu.experiments.runner import RunSummary

FIXED_COLUMNS = ["label", "seed", "status", "rounds", "failed_rounds", "final_accuracy", "best_accuracy",
                 "final_loss", "rounds_to_target", "fairness_mean", "fairness_worst10", "fairness_std",
                 "fairness_clients", "fairness_round", "wall_s", "error"]


def write_results(summaries: Sequence[RunSummary], out_dir: str | Path, name: str = "experiment",
                  target_accuracy: float | None = None) -> dict[str, Path]:
    """Write results.csv, results.md, results.json and the plots into ``out_dir``; returns label -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "table": out / "results.md", "json": out / "results.json"}
    write_csv(summaries, paths["csv"])
    paths["table"].write_text(results_markdown(summaries, name, target_accuracy))
    paths["json"].write_text(json.dumps({"name": name, "target_accuracy": target_accuracy,
                                         "runs": [asdict(s) for s in summaries]}, indent=2))
    ok = [s for s in summaries if s.ok]
    if ok:
        paths["accuracy plot"] = out / "accuracy_per_round.png"
        plot_accuracy(ok, paths["accuracy plot"], name, target_accuracy)
    if any(s.fairness for s in ok):
        paths["fairness plot"] = out / "fairness.png"
        plot_fairness(ok, paths["fairness plot"], name)
    if ok and target_accuracy is not None:
        paths["target plot"] = out / "rounds_to_target.png"
        plot_rounds_to_target(ok, paths["target plot"], name, target_accuracy)
    return paths


# --------------------------------------------------------------------------- tables


def write_csv(summaries: Sequence[RunSummary], path: Path) -> None:
    """One row per run: label, seed, the overridden settings, the summary numbers, extra metrics, error."""
    setting_keys = _unique(k for s in summaries for k in s.overrides if k not in FIXED_COLUMNS)
    extra_keys = _unique(k for s in summaries for k in s.extra_metrics)
    extra_columns = [k if k not in FIXED_COLUMNS and k not in setting_keys else f"central_{k}" for k in extra_keys]
    header = FIXED_COLUMNS[:2] + setting_keys + FIXED_COLUMNS[2:-2] + extra_columns + FIXED_COLUMNS[-2:]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for s in summaries:
            f = s.fairness
            row: list[Any] = [s.label, s.seed]
            row += [_cell(s.overrides.get(k)) for k in setting_keys]
            row += [s.status, s.rounds, s.failed_rounds, s.final_accuracy, s.best_accuracy, s.final_loss,
                    s.rounds_to_target]
            row += [f.mean, f.worst10, f.std, f.n_clients, f.round] if f else [None] * 5
            row += [s.extra_metrics.get(k) for k in extra_keys]
            row += [round(s.wall_s, 3), s.error]
            writer.writerow(["" if v is None else v for v in row])


def results_markdown(summaries: Sequence[RunSummary], name: str = "experiment",
                     target_accuracy: float | None = None) -> str:
    """A per-run table, then (when a label has several seeds) mean ± std per label, then failures."""
    lines = [f"# {name}", ""]
    if target_accuracy is not None:
        lines += [f"Target accuracy: {100 * target_accuracy:g}%", ""]
    lines += per_run_table(summaries, target_accuracy)
    groups = _by_label([s for s in summaries if s.ok])
    if any(len(runs) > 1 for runs in groups.values()):
        lines += ["", "## Mean ± std across seeds", ""] + per_label_table(groups, target_accuracy)
    failed = [s for s in summaries if not s.ok]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- {_md(s.label)} (seed {s.seed}): {_md(s.error or '')}" for s in failed]
    return "\n".join(lines) + "\n"


def per_run_table(summaries: Sequence[RunSummary], target_accuracy: float | None) -> list[str]:
    """Markdown rows: one per run, with only the columns some run has values for."""
    fair = any(s.fairness for s in summaries)
    extras = _unique(k for s in summaries for k in s.extra_metrics)
    header = ["run", "seed", "final acc. (%)", "best acc. (%)", "final loss"]
    header += ["rounds to target"] if target_accuracy is not None else []
    header += ["client acc. mean (%)", "worst 10% (%)", "client std (%)"] if fair else []
    header += extras + ["time (s)", "status"]
    rows = []
    for s in summaries:
        row = [_md(s.label), str(s.seed), _pct(s.final_accuracy), _pct(s.best_accuracy), _num(s.final_loss)]
        if target_accuracy is not None:
            row.append(_rounds(s))
        if fair:
            f = s.fairness
            row += [_pct(f.mean), _pct(f.worst10), _pct(f.std)] if f else ["–"] * 3
        row += [_num(s.extra_metrics.get(k)) for k in extras]
        row += [f"{s.wall_s:.1f}", s.status if not s.failed_rounds else f"{s.status}, {s.failed_rounds} failed round(s)"]
        rows.append(row)
    return _table(header, rows)


def per_label_table(groups: dict[str, list[RunSummary]], target_accuracy: float | None) -> list[str]:
    """Markdown rows: one per label, mean ± std (sample std) across its seeds."""
    fair = any(s.fairness for runs in groups.values() for s in runs)
    extras = _unique(k for runs in groups.values() for s in runs for k in s.extra_metrics)
    header = ["run", "seeds", "final acc. (%)", "best acc. (%)"]
    header += ["rounds to target"] if target_accuracy is not None else []
    header += ["client acc. mean (%)", "worst 10% (%)", "client std (%)"] if fair else []
    header += extras + ["time (s)"]
    rows = []
    for label, runs in groups.items():
        row = [_md(label), str(len(runs)), _mean_std([s.final_accuracy for s in runs], 100),
               _mean_std([s.best_accuracy for s in runs], 100)]
        if target_accuracy is not None:
            reached = [s.rounds_to_target for s in runs if s.rounds_to_target is not None]
            row.append(f"{len(reached)}/{len(runs)} reached" + (f", mean {np.mean(reached):.1f}" if reached else ""))
        if fair:
            fs = [s.fairness for s in runs]
            row += [_mean_std([f.mean if f else None for f in fs], 100),
                    _mean_std([f.worst10 if f else None for f in fs], 100),
                    _mean_std([f.std if f else None for f in fs], 100)]
        row += [_mean_std([s.extra_metrics.get(k) for s in runs], 1, digits=4) for k in extras]
        row.append(_mean_std([s.wall_s for s in runs], 1, digits=1))
        rows.append(row)
    return _table(header, rows)


# --------------------------------------------------------------------------- plots


def plot_accuracy(summaries: Sequence[RunSummary], path: Path, name: str, target: float | None = None) -> None:
    """Headline accuracy per round, one line per label (mean across seeds, band = min..max)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, runs in _by_label(summaries).items():
        by_round: dict[int, list[float]] = {}
        for s in runs:
            for rnd, acc in s.curve:
                by_round.setdefault(rnd, []).append(100 * acc)
        if not by_round:
            continue
        rounds = sorted(by_round)
        mean = [float(np.mean(by_round[r])) for r in rounds]
        (line,) = ax.plot(rounds, mean, marker="o", markersize=3, label=_short(label) + _seeds(runs))
        if len(runs) > 1:
            ax.fill_between(rounds, [min(by_round[r]) for r in rounds], [max(by_round[r]) for r in rounds],
                            color=line.get_color(), alpha=0.15)
    if target is not None:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:g}%")
    ax.set(xlabel="round", ylabel="accuracy (%)", title=f"{name}: test accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(plt, fig, path)


def plot_fairness(summaries: Sequence[RunSummary], path: Path, name: str) -> None:
    """Per-client local test accuracy at the last evaluated round, one box per label (seeds pooled)."""
    plt = _pyplot()
    groups = {label: [100 * a for s in runs if s.fairness for a in s.fairness.accuracies]
              for label, runs in _by_label(summaries).items()}
    groups = {k: v for k, v in groups.items() if v}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 5))
    ax.boxplot(list(groups.values()), showmeans=True, showfliers=False)  # every client is drawn below
    for i, values in enumerate(groups.values(), start=1):
        jitter = np.random.default_rng(i).uniform(-0.12, 0.12, len(values))
        ax.scatter(i + jitter, values, s=8, alpha=0.4, color="tab:blue")
    ax.set_xticks(range(1, len(groups) + 1), [_short(k) for k in groups], rotation=20, ha="right")
    ax.set(ylabel="client accuracy (%)", title=f"{name}\nper-client accuracy at the final evaluated round")
    ax.grid(alpha=0.3, axis="y")
    _save(plt, fig, path)


def plot_rounds_to_target(summaries: Sequence[RunSummary], path: Path, name: str, target: float) -> None:
    """Mean rounds to reach the target per label, over the runs that reached it (annotated k/n)."""
    plt = _pyplot()
    groups = _by_label(summaries)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 5))
    top = max((s.rounds for s in summaries), default=1)
    for i, runs in enumerate(groups.values()):
        reached = [s.rounds_to_target for s in runs if s.rounds_to_target is not None]
        height = float(np.mean(reached)) if reached else 0.0
        ax.bar(i, height, width=0.6, color="tab:green" if reached else "lightgrey")
        text = f"{len(reached)}/{len(runs)}" if reached else "not reached"
        ax.annotate(text, (i, height), ha="center", va="bottom", fontsize="small", xytext=(0, 2),
                    textcoords="offset points")
    ax.set_xticks(range(len(groups)), [_short(k) for k in groups], rotation=20, ha="right")
    ax.set_ylim(0, top + 1)
    ax.set(ylabel="rounds (mean over runs that reached it)", title=f"{name}\nrounds to {100 * target:g}% accuracy")
    ax.grid(alpha=0.3, axis="y")
    _save(plt, fig, path)


# --------------------------------------------------------------------------- helpers


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _by_label(summaries: Sequence[RunSummary]) -> dict[str, list[RunSummary]]:
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault(s.label, []).append(s)
    return groups


def _unique(items: Any) -> list[str]:
    return list(dict.fromkeys(items))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _mean_std(values: Sequence[float | None], scale: float, digits: int = 2) -> str:
    present = [scale * v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return "–"
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{np.mean(present):.{digits}f} ± {np.std(present, ddof=1):.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _rounds(s: RunSummary) -> str:
    if not s.ok:
        return "–"
    return "never" if s.rounds_to_target is None else str(s.rounds_to_target)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _short(label: str, width: int = 40) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def _seeds(runs: list[RunSummary]) -> str:
    return f" ({len(runs)} seeds)" if len(runs) > 1 else ""

