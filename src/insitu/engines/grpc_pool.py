"""The network engine's ClientPool: remote clients that pull tasks and push results over gRPC.

The round loop sees the same ``wait_for``/``fit``/``evaluate`` calls as in simulation. Behind them,
tasks wait in each connected client's mailbox until the client pulls them; results arrive from the
gRPC handler threads and are yielded to the loop as they come. A client whose heartbeats stop, or
that misses the round deadline, is reported as a failure for that round; its late result, if any,
is discarded. The servicer decodes at most a few uploads at a time (its upload slots) and each is
released only after the loop has folded it, so server memory stays O(slots x model) whatever the
number of clients.
"""

from __future__ import annotations

import logging
import queue
import re
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from insitu.client.api import Config, EvalResult, FitResult, ProtocolReply
from insitu.engines.base import EvalOutcome, FitOutcome, NotEnoughClientsError, Task
from insitu.params import Parameters, ParamSpec

log = logging.getLogger("insitu.server")


class ClientDroppedError(ConnectionError):
    """A client disconnected (heartbeats stopped) while it held a task."""


class RoundDeadlineError(TimeoutError):
    """A client did not return its result before the round deadline."""


class PoolClosedError(RuntimeError):
    """The server is shutting down."""


@dataclass
class PendingTask:
    """A task handed to one client, waiting for its result."""

    task_id: str
    client_id: str
    kind: str  # "fit" | "evaluate" | "secagg" (one step of secure aggregation)
    server_round: int
    config: Config
    parameters: Parameters | None
    expected: tuple[ParamSpec, ...]
    session_token: str = ""  # the session it was handed to; a reconnect means it is lost


@dataclass
class Session:
    """One authenticated connection of a client."""

    client_id: str
    token: str
    peer: str
    last_seen: float
    mailbox: queue.Queue[PendingTask] = field(default_factory=queue.Queue)
    alive: bool = True


@dataclass(eq=False)  # hashed by identity (a set of waiting deliveries)
class _Delivery:
    task: PendingTask
    outcome: FitResult | EvalResult | ProtocolReply | BaseException
    consumed: threading.Event = field(default_factory=threading.Event)


SHUTDOWN = object()


def natural_order(client_ids: Iterator[str] | Sequence[str]) -> list[str]:
    """Ids sorted with digit runs compared as numbers ("2" < "10"): the simulation's order for "0".."N-1"."""
    return sorted(client_ids, key=lambda cid: [(0, int(p), "") if p.isdigit() else (1, 0, p)
                                               for p in re.split(r"(\d+)", cid) if p])


class GrpcClientPool:
    """Registry of connected clients plus the ClientPool calls the round loop makes."""

    def __init__(self, *, round_timeout: float | None = None, heartbeat_timeout: float = 15.0,
                 max_clients: int = 1000) -> None:
        self.round_timeout = round_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.max_clients = max_clients
        self._lock = threading.Condition()
        self._sessions: dict[str, Session] = {}  # by token
        self._by_client: dict[str, Session] = {}
        self._pending: dict[str, PendingTask] = {}
        self._results: queue.Queue[_Delivery] = queue.Queue()
        self._closed = False
        self.resumable = False  # set by close(): the run stopped early and can be resumed
        self._delivering: set[_Delivery] = set()  # uploads whose handler waits until the loop folds them
        self.model_values = 0  # values of the last model dispatched: bounds what a client may upload
        self.listeners: list[Any] = []  # callables(event: str, client_id: str, detail: str)

    # -- registry (called by the gRPC servicer) ----------------------------------------------
    def register(self, client_id: str, peer: str) -> Session:
        """A client authenticated: a new session replaces any older one of the same id."""
        with self._lock:
            if self._closed:
                raise PoolClosedError("server is shutting down")
            old = self._by_client.get(client_id)
            if old is None and len(self._by_client) >= self.max_clients:
                raise PoolClosedError(f"server is full ({self.max_clients} clients)")
            if old is not None:
                self._drop(old, "reconnected")
            session = Session(client_id, secrets.token_urlsafe(24), peer, time.monotonic())
            self._sessions[session.token] = session
            self._by_client[client_id] = session
            self._lock.notify_all()
        self.notify("joined", client_id, peer)
        return session

    def session(self, token: str) -> Session | None:
        """The live session for ``token`` (touching its liveness), or None."""
        with self._lock:  # only this session is checked: heartbeats must not scan every client
            session = self._sessions.get(token)
            if session is None:
                return None
            now = time.monotonic()
            if now - session.last_seen > self.heartbeat_timeout:
                self._drop(session, f"no heartbeat for {now - session.last_seen:.0f} s")
                return None
            session.last_seen = now
            return session

    def leave(self, token: str) -> None:
        with self._lock:
            session = self._sessions.get(token)
            if session is not None:
                self._drop(session, "left")

    def next_task(self, session: Session, wait_s: float) -> PendingTask | object | None:
        """The session's next task, SHUTDOWN, or None if nothing came within ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            if self._closed:
                return SHUTDOWN
            if not session.alive:
                return None
            try:
                return session.mailbox.get(timeout=min(0.25, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                session.last_seen = time.monotonic()  # a waiting pull is a sign of life
                if time.monotonic() >= deadline:
                    return None

    def pending_task(self, task_id: str) -> PendingTask | None:
        with self._lock:
            return self._pending.get(task_id)

    def deliver(self, task: PendingTask, outcome: FitResult | EvalResult | ProtocolReply | BaseException,
                wait_consumed: float | None = None) -> bool:
        """Hand a result to the round loop; False if the task is no longer awaited (late)."""
        with self._lock:
            if self._pending.pop(task.task_id, None) is None:
                return False
        delivery = _Delivery(task, outcome)
        self._results.put(delivery)
        if wait_consumed is not None:
            with self._lock:
                if self._closed:  # nobody will fold it: do not hold the handler thread
                    return True
                self._delivering.add(delivery)
            try:
                delivery.consumed.wait(wait_consumed)
            finally:
                with self._lock:
                    self._delivering.discard(delivery)
        return True

    def connected(self) -> list[str]:
        with self._lock:
            self._expire_stale()
            return natural_order(self._by_client)

    # -- ClientPool --------------------------------------------------------------------------
    def wait_for(self, num_clients: int, timeout: float | None = None) -> list[str]:
        deadline = None if timeout is None else time.monotonic() + timeout
        announced = -1
        with self._lock:
            while True:
                self._expire_stale()
                if self._closed:
                    raise PoolClosedError("server is shutting down")
                have = len(self._by_client)
                if have >= num_clients:
                    return natural_order(self._by_client)
                if have != announced:
                    log.info("waiting for clients: %d of %d connected", have, num_clients)
                    announced = have
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise NotEnoughClientsError(
                        f"only {have} of the {num_clients} required clients connected within {timeout:.0f} s"
                    )
                self._lock.wait(timeout=1.0 if remaining is None else min(1.0, remaining))

    def fit(self, parameters: Parameters, tasks: Sequence[Task]) -> Iterator[tuple[str, FitOutcome]]:
        return self._dispatch("fit", parameters, tasks)  # type: ignore[return-value]

    def evaluate(self, parameters: Parameters, tasks: Sequence[Task]) -> Iterator[tuple[str, EvalOutcome]]:
        return self._dispatch("evaluate", parameters, tasks)  # type: ignore[return-value]

    def exchange(self, parameters: Parameters | None,
                 tasks: Sequence[Task]) -> Iterator[tuple[str, ProtocolReply | BaseException]]:
        """One step of secure aggregation: each task's config carries that client's protocol message."""
        return self._dispatch("secagg", parameters, tasks)

    def close(self, resumable: bool = False) -> None:
        """Tell every client to shut down (at its next pull) and fail what is in flight.

        ``resumable``: the run stopped before its end and may be resumed, so clients should wait and
        reconnect rather than leave. Every handler waiting on the loop is woken."""
        with self._lock:
            if not self._closed:
                self.resumable = resumable
            self._closed = True
            for delivery in self._delivering:
                delivery.consumed.set()
            self._delivering.clear()
            self._lock.notify_all()

    # -- internals ---------------------------------------------------------------------------
    def _dispatch(self, kind: str, parameters: Parameters | None, tasks: Sequence[Task]) -> Iterator[tuple[str, Any]]:
        expected = parameters.specs if parameters is not None else ()
        if parameters is not None:
            self.model_values = parameters.num_values
        waiting: dict[str, PendingTask] = {}
        with self._lock:
            for task in tasks:
                server_round = int(task.config.get("round", 0))
                pending = PendingTask(secrets.token_hex(8), task.client_id, kind, server_round,
                                      dict(task.config), parameters, expected)
                session = self._by_client.get(task.client_id)
                waiting[pending.task_id] = pending
                if session is None:
                    continue
                pending.session_token = session.token
                self._pending[pending.task_id] = pending
                session.mailbox.put(pending)
        for pending in list(waiting.values()):
            if pending.task_id not in self._pending:
                waiting.pop(pending.task_id)
                yield pending.client_id, ClientDroppedError(f"client {pending.client_id} disconnected before the round")
        deadline = None if self.round_timeout is None else time.monotonic() + self.round_timeout
        while waiting:
            try:
                delivery = self._results.get(timeout=0.25)
            except queue.Empty:
                yield from self._fail_lost(waiting, deadline)
                continue
            if waiting.pop(delivery.task.task_id, None) is None:
                delivery.consumed.set()
                continue
            outcome, delivery.outcome = delivery.outcome, None
            try:
                yield delivery.task.client_id, outcome
            finally:
                del outcome  # the loop has folded it; only then may the next upload be decoded
                delivery.consumed.set()
                del delivery

    def _fail_lost(self, waiting: dict[str, PendingTask], deadline: float | None) -> Iterator[tuple[str, BaseException]]:
        """Fail tasks whose client vanished, or all remaining ones once the deadline passed."""
        now = time.monotonic()
        with self._lock:
            self._expire_stale()
            lost = []
            for task_id, task in list(waiting.items()):
                session = self._by_client.get(task.client_id)
                if self._closed:
                    lost.append((task, PoolClosedError("server is shutting down")))
                elif session is None or session.token != task.session_token:
                    lost.append((task, ClientDroppedError(f"client {task.client_id} disconnected during the round")))
                elif deadline is not None and now >= deadline:
                    lost.append((task, RoundDeadlineError(
                        f"no result within the round deadline of {self.round_timeout:.0f} s")))
            for task, _ in lost:
                waiting.pop(task.task_id, None)
                self._pending.pop(task.task_id, None)
        for task, error in lost:
            yield task.client_id, error

    def _expire_stale(self) -> None:
        now = time.monotonic()
        for session in list(self._by_client.values()):
            if now - session.last_seen > self.heartbeat_timeout:
                self._drop(session, f"no heartbeat for {now - session.last_seen:.0f} s")

    def _drop(self, session: Session, reason: str) -> None:
        session.alive = False
        self._sessions.pop(session.token, None)
        if self._by_client.get(session.client_id) is session:
            del self._by_client[session.client_id]
        self.notify("left", session.client_id, reason)

    def notify(self, event: str, client_id: str, detail: str) -> None:
        """Log a client event (joined, left, rejected) and pass it to the listeners (the store)."""
        log.info("client %s %s (%s)", client_id, event, detail)
        for listener in self.listeners:
            try:
                listener(event, client_id, detail)
            except Exception:  # a listener must never break the registry
                log.exception("client event listener failed")
