"""``insitu report RUN_DIR``: write a finished run's self-contained HTML report."""

from __future__ import annotations

from pathlib import Path

import typer

from insitu.cli.common import console, fail


def report(
    run_dir: Path = typer.Argument(..., help="A run's output folder (it holds history.json and config.json)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where to write the HTML (default RUN_DIR/report.html)."),
) -> None:
    """Write one self-contained HTML report of a finished run: plots, per-client table, fairness, privacy, config."""
    from insitu.report.html import write_report

    try:
        path = write_report(run_dir, out)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise fail(str(error)) from None
    console.print(f"Report: [bold]{path}[/] (one file, no external assets)", highlight=False)
