"""The network engine: remote clients that pull tasks and push results over gRPC.

The round loop sees the same ``wait_for``/``submit``/``results`` stream as in simulation. Behind them,
every task is an :class:`~insitu.protocols.envelope.Envelope` waiting in its client's mailbox until
the client pulls it; replies arrive from the gRPC handler threads and are yielded as they come.
``submit`` sends plain fit and evaluate tasks (the plain exchange's envelopes); ``exchange`` sends
any round protocol's envelopes, each with what its reply may carry, and yields the reply envelopes.
The pool never looks inside an envelope. A client whose heartbeats stop, or
that misses the round deadline, is reported as a failure for that round; its late result, if any,
is discarded. The servicer decodes at most a few uploads at a time (its upload slots) and each is
released only after the loop has folded it, so server memory stays O(slots x model) whatever the
number of clients.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from insitu.engines.base import NotEnoughClientsError, Task, TaskKind, TaskResult
from insitu.params import Parameters, ParamSpec
from insitu.protocols import plain
from insitu.protocols.envelope import Envelope, Expect

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
    envelope: Envelope
    expect: Expect  # what its reply may carry
    model: tuple[ParamSpec, ...]  # the model it concerns: a reply's parameters must match it, arrays fit in it
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
    outcome: Envelope | BaseException | None  # None once handed to the loop
    consumed: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Waiting:
    """A submitted task not yet answered: its engine id, its deadline, and how its reply is read
    (``submit``'s tasks: as the plain exchange's FitResult/EvalResult; ``exchange``'s: as the envelope)."""

    task_id: int
    task: PendingTask
    deadline: float | None
    read: Callable[[Envelope], Any] | None = None

    def result(self, outcome: Envelope | BaseException, finished_at: float) -> TaskResult:
        if self.read is not None and isinstance(outcome, Envelope):
            outcome = self.read(outcome)
        envelope = self.task.envelope
        # an exchange task's outcome stays the reply envelope, which its protocol reads itself
        return TaskResult(self.task_id, self.task.client_id, envelope.protocol, envelope.model_version,
                          outcome, finished_at)  # type: ignore[arg-type]


SHUTDOWN = object()
MESSAGE_BYTES_PER_VALUE = 8  # opaque protocol bytes a reply may carry per model value (a masked vector needs 4)
MESSAGE_SLACK_BYTES = 4 << 20  # ... plus this much (key and share messages: one per peer)


def natural_order(client_ids: Iterable[str]) -> list[str]:
    """Ids sorted with digit runs compared as numbers ("2" < "10"): the simulation's order for "0".."N-1"."""
    return sorted(client_ids, key=lambda cid: [(0, int(p), "") if p.isdigit() else (1, 0, p)
                                               for p in re.split(r"(\d+)", cid) if p])


class GrpcClientPool:
    """Registry of connected clients plus the Engine calls (a task stream) the round policies make."""

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
        self._waiting: dict[str, _Waiting] = {}  # by wire task id: submitted, not yet yielded
        self._failed: collections.deque[TaskResult] = collections.deque()  # failed before any reply
        self._task_ids = itertools.count()
        self._started = time.monotonic()
        self._closed = False
        self.resumable = False  # set by close(): the run stopped early and can be resumed
        self._delivering: set[_Delivery] = set()  # uploads whose handler waits until the loop folds them
        self.model_values = 0  # values of the last model dispatched: bounds what a client may upload
        self._model: tuple[ParamSpec, ...] = ()  # specs of the last model dispatched
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

    def deliver(self, task: PendingTask, outcome: Envelope | BaseException,
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

    # -- Engine --------------------------------------------------------------------------
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

    def submit(self, kind: TaskKind, parameters: Parameters, model_version: int,
               tasks: Sequence[Task]) -> list[int]:
        """Send plain fit or evaluate tasks (the plain exchange's envelopes); their results are read
        back as FitResult/EvalResult. A client not connected fails its task at once.

        Each task must come back within ``round_timeout`` of its submission, or it fails with
        RoundDeadlineError."""
        envelopes = [(task.client_id, plain.task_envelope(kind, parameters, model_version, task.config))
                     for task in tasks]
        expect = plain.expect(kind, [task.config for task in tasks])  # only the extras the tasks' algorithm returns
        return self._post(envelopes, expect, functools.partial(plain.read_reply, kind))

    def exchange(self, envelopes: Sequence[tuple[str, Envelope]],
                 expect: Expect) -> Iterator[tuple[str, Envelope | BaseException]]:
        """One step of a round protocol: send each client its envelope and yield ``(client id, reply
        envelope or failure)`` as they come back, until all are. Nothing else may be outstanding.

        ``expect`` says what every reply may carry; the opaque protocol bytes it allows must be within
        what a model of the last dispatched size justifies (``MESSAGE_BYTES_PER_VALUE`` per value, plus
        ``MESSAGE_SLACK_BYTES``)."""
        if self.outstanding():
            raise RuntimeError(f"{self.outstanding()} task(s) are still outstanding: a protocol step needs an idle "
                               "engine")
        for _, envelope in envelopes:
            if envelope.parameters is not None:
                self.model_values = envelope.parameters.num_values
        limit = MESSAGE_BYTES_PER_VALUE * self.model_values + MESSAGE_SLACK_BYTES
        if expect.message_bytes > limit:
            raise ValueError(f"a reply of up to {expect.message_bytes} protocol bytes exceeds the {limit} bytes a "
                             f"model of {self.model_values} values may need: the protocol declares too much")
        self._post(envelopes, expect, None)
        for result in self.results():
            yield result.client_id, result.outcome  # type: ignore[misc]

    def _post(self, envelopes: Sequence[tuple[str, Envelope]], expect: Expect,
              read: Callable[[Envelope], Any] | None) -> list[int]:
        """Put each envelope in its client's mailbox; a client not connected fails its task at once."""
        deadline = None if self.round_timeout is None else time.monotonic() + self.round_timeout
        ids: list[int] = []
        with self._lock:
            for client_id, envelope in envelopes:
                if envelope.parameters is not None:
                    self.model_values = envelope.parameters.num_values
                    self._model = envelope.parameters.specs
                pending = PendingTask(secrets.token_hex(8), client_id, envelope, expect, self._model)
                task_id = next(self._task_ids)
                ids.append(task_id)
                self._waiting[pending.task_id] = _Waiting(task_id, pending, deadline, read)
                session = self._by_client.get(client_id)
                if session is None:
                    self._failed.append(self._waiting.pop(pending.task_id).result(
                        ClientDroppedError(f"client {client_id} was not connected when its task was sent"),
                        self.clock()))
                    continue
                pending.session_token = session.token
                self._pending[pending.task_id] = pending
                session.mailbox.put(pending)
        return ids

    def results(self) -> Iterator[TaskResult]:
        """Results as they arrive; a lost client, a passed deadline or shutdown fails its task."""
        while self._failed or self._waiting:
            if self._failed:
                yield self._failed.popleft()
                continue
            try:
                delivery = self._results.get(timeout=0.25)
            except queue.Empty:
                self._fail_lost()
                continue
            waiting = self._waiting.pop(delivery.task.task_id, None)
            if waiting is None:  # late, or failed already
                delivery.consumed.set()
                continue
            outcome, delivery.outcome = delivery.outcome, None
            assert outcome is not None  # handed to the loop only once
            result = waiting.result(outcome, self.clock())
            del outcome
            try:
                yield result
            finally:
                del result  # the loop has folded it; only then may the next upload be decoded
                delivery.consumed.set()
                del delivery

    def outstanding(self) -> int:
        return len(self._waiting) + len(self._failed)

    def clock(self) -> float:
        return time.monotonic() - self._started

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
    def _fail_lost(self) -> None:
        """Fail tasks whose client vanished, or whose deadline passed; all of them on shutdown."""
        now = time.monotonic()
        with self._lock:
            self._expire_stale()
            for wire_id, waiting in list(self._waiting.items()):
                task = waiting.task
                session = self._by_client.get(task.client_id)
                error: BaseException | None = None
                if self._closed:
                    error = PoolClosedError("server is shutting down")
                elif session is None or session.token != task.session_token:
                    error = ClientDroppedError(f"client {task.client_id} disconnected while it held a task")
                elif waiting.deadline is not None and now >= waiting.deadline:
                    error = RoundDeadlineError(f"no result within the round deadline of {self.round_timeout:.0f} s")
                if error is not None:
                    del self._waiting[wire_id]
                    self._pending.pop(wire_id, None)
                    self._failed.append(waiting.result(error, self.clock()))

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
