"""The dashboard's command-line side: ``--dashboard`` on simulate/server, and ``insitu dashboard RUN_DIR``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import typer

from insitu.cli.common import console, err_console, fail
from insitu.dashboard.app import DEFAULT_PORT, DashboardServer, is_loopback_host
from insitu.dashboard.feed import DashboardFeed
from insitu.params import Parameters
from insitu.run.history import History, RoundRecord
from insitu.run.loop import RoundCallback
from insitu.strategies.strategy import ServerState

PORT_HELP = f"Port of --dashboard (default {DEFAULT_PORT}; 0 = any free port)."
HOST_HELP = ("Address --dashboard listens on. Default 127.0.0.1 (this machine only); any other address shows "
             "who takes part and why clients fail to whoever reaches it.")


def start_dashboard(feed: DashboardFeed, port: int, host: str = "127.0.0.1", wait: bool = False) -> DashboardServer:
    """Serve ``feed`` in the background and print its address (warning when it is not loopback-only);
    with ``wait``, return only once a browser has opened it."""
    if not is_loopback_host(host):
        err_console.print(f"[bold yellow]warning:[/] the dashboard listens on {host}, not only on this machine: "
                          "anyone who reaches it sees which clients take part and why they fail")
    try:
        server = DashboardServer(feed, host, port, allow_network=True).start()  # a non-loopback host was given
    except ImportError as error:
        raise fail(str(error)) from None
    except (OSError, ValueError, RuntimeError) as error:
        raise fail(str(error)) from None
    console.print(f"Dashboard: [bold]{server.url}[/]", highlight=False)
    if wait:
        console.print("waiting for a browser to open the dashboard before the first round (Ctrl-C to quit)")
        feed.wait_for_viewer()
    return server


class RunDashboard:
    """A run's dashboard, or nothing when it is off: ``also(callback)`` feeds each round to it as well,
    ``finish(history)`` tells open pages the run ended."""

    def __init__(self, feed: DashboardFeed | None, server: DashboardServer | None) -> None:
        self.feed, self.server = feed, server

    def also(self, callback: RoundCallback) -> RoundCallback:
        """``callback``, then (when the dashboard is on) the feed's."""
        feed = self.feed
        if feed is None:
            return callback

        def both(record: RoundRecord, parameters: Parameters, state: ServerState) -> None:
            callback(record, parameters, state)
            feed.on_round(record)
        return both

    def watch(self, server: Any) -> None:
        """``serve``'s ``on_start``: show the server's connected clients, tasks in flight and client events."""
        if self.feed is not None:
            self.feed.attach_pool(server.pool)
            server.pool.listeners.append(self.feed.client_event)

    def finish(self, history: History | None = None, error: str | None = None) -> None:
        if self.feed is not None:
            self.feed.finish(history, error)


@contextmanager
def run_dashboard(config: Any, enabled: bool, port: int, host: str = "127.0.0.1", wait: bool = False,
                  mode: str = "simulation") -> Iterator[RunDashboard]:
    """``--dashboard`` around a run: serve while it goes on; at its end give open pages the last rounds (a
    run that raised is shown as failed) and stop serving. A no-op when not ``enabled``."""
    if not enabled:
        yield RunDashboard(None, None)
        return
    feed = DashboardFeed(asdict(config) if is_dataclass(config) and not isinstance(config, type) else dict(config),
                         mode=mode)
    server = start_dashboard(feed, port, host, wait)
    live = RunDashboard(feed, server)
    try:
        yield live
    except BaseException as error:
        feed.finish(error=f"the run stopped: {type(error).__name__}: {error}" if str(error) else
                    f"the run stopped: {type(error).__name__}")
        raise
    finally:
        if not feed.done:
            feed.finish()
        server.stop()


def dashboard(
    run_dir: Path = typer.Argument(..., help="A run's output folder (it holds history.json and config.json)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", "-p", help=PORT_HELP.replace("--dashboard", "the dashboard")),
    host: str = typer.Option("127.0.0.1", "--host", help=HOST_HELP.replace("--dashboard", "The dashboard")),
) -> None:
    """Show a finished run's dashboard (reads history.json and config.json; Ctrl-C to stop)."""
    from insitu.report.summary import load_run

    try:
        history, config = load_run(run_dir)
        feed = feed_from_history(history, config)
    except (ValueError, FileNotFoundError) as error:
        raise fail(str(error)) from None
    except (TypeError, KeyError, AttributeError) as error:  # a history.json whose rounds hold the wrong types
        raise fail(f"{run_dir / 'history.json'} holds values insitu cannot show ({type(error).__name__}: "
                   f"{error}): give the folder a run wrote") from None
    server = start_dashboard(feed, port, host)
    console.print(f"{len(history.rounds)} rounds from {run_dir}; Ctrl-C to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def feed_from_history(history: History, config: dict[str, Any]) -> DashboardFeed:
    """A finished feed holding every round of ``history``."""
    feed = DashboardFeed(config, mode="finished run")
    for record in history.rounds:
        feed.on_round(record)
    feed.finish(history)
    return feed
