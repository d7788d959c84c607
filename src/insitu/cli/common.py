"""Console, logging and error exit shared by every command."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)

# Options `insitu simulate` and `insitu server` share, declared once (typer reads them, never changes them).
DASHBOARD_PORT_OPTION: int = typer.Option(8050, "--dashboard-port", help="Port of --dashboard (0 = any free port).")
DASHBOARD_HOST_OPTION: str = typer.Option("127.0.0.1", "--dashboard-host", help="Address of --dashboard (default: "
                                          "this machine only; another shows who takes part to whoever reaches it).")
TENSORBOARD_OPTION: Path | None = typer.Option(None, "--tensorboard", help="Also log each round's metrics as "
                                               "TensorBoard scalars into DIR (pip install 'insitu[tensorboard]').")
MLFLOW_OPTION: bool = typer.Option(False, "--mlflow", help="Also log each round's metrics and the settings to an "
                                   "MLflow run: at $MLFLOW_TRACKING_URI, --mlflow-uri, else a file store "
                                   "OUTPUT/mlruns (pip install 'insitu[mlflow]').")
MLFLOW_URI_OPTION: str | None = typer.Option(None, "--mlflow-uri", help="MLflow tracking URI (implies --mlflow).")


def setup_logging(verbose: bool) -> None:
    """INFO (client events, rejections) when verbose, else WARNING; always to stderr."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` and return the exit (code 2) for the caller to raise. The message is shown
    as written: brackets in it (``[server]``, ``[-B, B]``) are text, not console markup."""
    err_console.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code=2)
