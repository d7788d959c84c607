"""``insitu experiment CONFIG``: run a grid of simulations and write a results table and plots."""

from __future__ import annotations

from pathlib import Path

import typer

from insitu.cli.common import console, err_console, fail, setup_logging


def experiment(
    config: Path = typer.Argument(..., help="Experiment TOML file: [base] settings, a [grid] of lists, [[runs]]."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o",
                                              help="Where results go (default insitu-runs/experiment-<time>)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the expanded runs and exit; nothing trains."),
    only: list[str] | None = typer.Option(None, "--only", help="Run only the runs whose label is exactly this (repeatable)."),
) -> None:
    """Run every point of an experiment grid; write results.csv, results.md and plots."""
    from insitu.experiments import expand_grid, load_spec, run_experiment, write_results
    from insitu.experiments.runner import RunSummary

    setup_logging(False)
    try:
        spec = load_spec(config)
        runs = expand_grid(spec)  # every point validated before anything trains
        if only:
            unknown = sorted(set(only) - {run.label for run in runs})
            if unknown:
                raise ValueError(f"--only {', '.join(unknown)}: no such run label; labels are "
                                 f"{', '.join(sorted({run.label for run in runs}))}")
            runs = [run for run in runs if run.label in only]
    except (ValueError, FileNotFoundError) as error:
        raise fail(str(error)) from None

    if dry_run:
        console.print(f"[bold]{spec.name}[/]: {len(runs)} run(s) from {config}", highlight=False, soft_wrap=True)
        for number, run in enumerate(runs, start=1):
            c = run.config
            console.print(f"  {number:>3}. {run.label}  seed {run.seed}  ({c.dataset}, {c.model}, {c.strategy}, "
                          f"{c.num_clients} clients, {c.rounds} rounds)", markup=False, highlight=False, soft_wrap=True)
        console.print("Dry run: nothing trained.")
        return

    out = output_dir or _default_output_dir()
    target = spec.target_accuracy
    console.print(f"[bold]insitu experiment[/]  {spec.name}: {len(runs)} run(s); outputs in [bold]{out}[/]",
                  highlight=False, soft_wrap=True)

    def report(summary: RunSummary, number: int, total: int) -> None:
        head = f"[{number}/{total}] {summary.label}  seed {summary.seed}"
        if not summary.ok:
            err_console.print(f"{head}  FAILED after {summary.wall_s:.1f} s: {summary.error}", markup=False,
                              highlight=False, style="bold red", soft_wrap=True)
            return
        parts = [head]
        acc = summary.final_accuracy
        parts.append(f"final accuracy {100 * acc:.2f}%" if acc is not None else "no accuracy recorded")
        if target is not None:
            reached = summary.rounds_to_target
            parts.append(f"target reached at round {reached}" if reached is not None else "target not reached")
        if summary.fairness is not None:
            parts.append(f"worst-10% client {100 * summary.fairness.worst10:.1f}%")
        if summary.failed_rounds:
            parts.append(f"{summary.failed_rounds} failed round(s)")
        parts.append(f"{summary.wall_s:.1f} s")
        console.print("  ".join(parts), markup=False, highlight=False, soft_wrap=True)

    summaries = run_experiment(runs, out, on_run=report, target_accuracy=target)
    paths = write_results(summaries, out, spec.name, target)
    console.print()
    console.print(paths["table"].read_text(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"[bold green]Done[/]: {len(summaries)} run(s). Outputs in [bold]{out}[/]:", highlight=False, soft_wrap=True)
    for label, path in paths.items():
        console.print(f"  {label:<14} {path}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"  {'runs':<14} {out / 'runs'} (history.json, config.json per run)", markup=False,
                  highlight=False, soft_wrap=True)
    failed = [s for s in summaries if not s.ok]
    if failed:
        err_console.print(f"[bold red]{len(failed)} run(s) failed[/]: "
                          + "; ".join(f"{s.label} (seed {s.seed})" for s in failed)
                          + f" (tracebacks in {out / 'runs'}/*/error.txt)", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)


def _default_output_dir() -> Path:
    from datetime import datetime

    return Path("insitu-runs") / datetime.now().strftime("experiment-%Y%m%d-%H%M%S")
