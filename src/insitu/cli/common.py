"""Console, logging and error exit shared by every command."""

from __future__ import annotations

import logging

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


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
