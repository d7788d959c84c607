"""What the dashboard shows, gathered while a run goes on: a thread-safe, read-only feed.

The round loop's ``on_round`` callback and the server's client-event listener write here (a few
dictionary updates under a lock: the run never waits on a browser); the web server's threads read
snapshots. Nothing here imports the web stack, so a run with no dashboard never needs it.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from insitu.params import Parameters
from insitu.report.summary import (
    ClientTally,
    accounts_privacy,
    clipped,
    config_items,
    default_title,
    evaluation_dict,
    fairness_of,
    plain,
    privacy_summary,
    round_row,
)
from insitu.run.history import History, RoundRecord
from insitu.strategies.strategy import ServerState

MAX_EVENTS = 200  # the latest client events (joined, left, rejected) kept for the page


class LivePool(Protocol):
    """What the dashboard reads from a server's client pool (GrpcClientPool has both)."""

    def connected(self) -> list[str]: ...

    def outstanding(self) -> int: ...


class DashboardFeed:
    """The state of one run for the dashboard: round rows, per-client counts, client events, live pool facts.

    ``version`` grows with every change, so a page's event stream sends only when something happened."""

    def __init__(self, config: dict[str, Any], *, mode: str = "simulation", title: str = "",
                 max_events: int = MAX_EVENTS) -> None:
        self.config = dict(config)
        self.mode = mode
        self.title = title or default_title(self.config)
        self._dp = accounts_privacy(self.config)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._rows: list[dict[str, Any]] = []
        self._tally = ClientTally()
        self._fairness: dict[str, Any] | None = None
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_events)
        self._initial: dict[str, Any] | None = None
        self._stopped: str | None = None
        self._error: str | None = None
        self._done = False
        self._pool: LivePool | None = None
        self._viewers = 0
        self._ever_viewed = False
        self._started = time.time()
        self.version = 0
        self._config_items = config_items(self.config)
        self._cache: dict[str, Any] = {}
        self._cache_version = -1

    # -- written by the run ----------------------------------------------------------------------------
    def on_round(self, record: RoundRecord, _parameters: Parameters | None = None,
                 _state: ServerState | None = None) -> None:
        """The loop's ``on_round`` callback: add the round's row and its clients (cheap, never blocks long)."""
        fair = fairness_of(record)
        row = round_row(record, fair, dp=self._dp)
        with self._changed:
            self._rows.append(row)
            self._tally.add(record)
            if fair is not None:
                self._fairness = fair
            self._bump()

    def client_event(self, event: str, client_id: str, detail: str) -> None:
        """A server pool listener: a client joined, left (and why) or had an update rejected (and why)."""
        with self._changed:
            self._events.append({"time": time.time(), "event": clipped(str(event), 50),
                                 "client": clipped(str(client_id)), "detail": clipped(str(detail))})
            self._bump()

    def attach_pool(self, pool: LivePool) -> None:
        """Show a server's connected clients and its tasks in flight, read when a page asks."""
        with self._changed:
            self._pool = pool
            self._bump()

    def finish(self, history: History | None = None, error: str | None = None) -> None:
        """The run ended (or failed with ``error``): pages show it as finished and stop listening."""
        with self._changed:
            if history is not None:
                self._initial = evaluation_dict(history.initial)
                self._stopped = history.stopped
            self._error = error
            self._done = True
            self._pool = None
            self._bump()

    def _bump(self) -> None:
        self.version += 1
        self._changed.notify_all()

    # -- read by the web server ------------------------------------------------------------------------
    def live(self) -> dict[str, Any] | None:
        """A server's connected clients and tasks in flight now (None in simulation, or once finished)."""
        pool = self._pool
        if pool is None:
            return None
        try:
            connected = pool.connected()
            in_flight = pool.outstanding()
        except Exception as error:  # noqa: BLE001 - a page must never break the server; it shows the problem
            return {"connected": [], "in_flight": 0, "error": f"{type(error).__name__}: {error}"}
        return {"connected": connected[:1000], "num_connected": len(connected), "in_flight": in_flight}

    def snapshot(self, since: int = 0) -> dict[str, Any]:
        """Everything a page shows, with the round rows from index ``since`` on (a page holds the earlier ones)."""
        live = self.live()
        with self._lock:
            rows = self._rows[since:]
            if self._cache_version != self.version:  # computed once per change, however many pages watch
                self._cache = {  # plain(): a NaN in config.json must not make the page's JSON invalid
                    "title": self.title, "mode": self.mode, "num_rounds": plain(self.config.get("rounds")),
                    "initial": self._initial, "clients": self._tally.rows(), "num_clients_seen": len(self._tally.clients),
                    "fairness": self._fairness, "privacy": privacy_summary(self.config, self._rows),
                    "config": self._config_items, "events": list(self._events), "stopped": self._stopped,
                    "error": self._error, "done": self._done, "started": self._started, "version": self.version,
                }
                self._cache_version = self.version
            return {**self._cache, "rounds_from": since, "rounds": rows, "rounds_to": since + len(rows), "live": live}

    def viewer(self, joined: bool) -> None:
        """A page's event stream opened (``joined``) or closed."""
        with self._changed:
            self._viewers += 1 if joined else -1
            self._ever_viewed = self._ever_viewed or joined
            self._changed.notify_all()

    @property
    def done(self) -> bool:
        return self._done

    @property
    def viewers(self) -> int:
        return self._viewers

    def wait_for_viewer(self, timeout: float | None = None, interrupted: Callable[[], bool] = lambda: False) -> bool:
        """Block until a page has opened the event stream (``--dashboard-wait``); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not self._ever_viewed and not interrupted():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(0.5 if remaining is None else min(0.5, remaining))
            return self._ever_viewed
