"""Engines that train several clients at once (worker processes, Ray actors), with in-process results.

A :class:`ParallelPool` is the in-process engine's queue with the work sent elsewhere: tasks are
ordered exactly as :class:`~insitu.engines.inprocess.InProcessPool` orders them (submission order,
or simulated finish time under a systems model), started eagerly on a :class:`TaskRunner` up to a
window of tasks ahead of the consumer, and yielded in that same order. So a policy folds the same
updates in the same order whatever runs them, and the same seed gives the same parameters, bit for
bit, as in-process (given equal torch thread counts: the kernels' reduction order depends on them).

Only the runner knows the transport; it reports each finished task's outcome, or the failure that
stands for it (a lost worker reports :class:`WorkerLost` for the tasks it held, and the round goes on).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from insitu.client.api import Client, Config
from insitu.engines.base import Outcome, TaskKind, TaskResult
from insitu.engines.inprocess import InProcessPool, _Queued
from insitu.engines.systems import SystemsModel
from insitu.params import Parameters


class WorkerLost(RuntimeError):
    """The worker running a task died (killed, out of memory, node lost) before it reported back."""


@dataclass(frozen=True)
class Job:
    """One task as a runner sees it. ``parameters`` is shared by every job of one ``submit``: a runner
    ships it once per worker per ``model_version``, not once per job."""

    task_id: int
    client_id: str
    kind: TaskKind
    config: Config
    model_version: int
    parameters: Parameters


class TaskRunner(Protocol):
    """Runs jobs somewhere else and reports them back (any order)."""

    @property
    def slots(self) -> int:
        """How many jobs it runs at once (its workers)."""

    def start(self, job: Job) -> None:
        """Begin ``job``; never blocks on the job itself."""

    def finished(self) -> list[tuple[int, Outcome]]:
        """Block until at least one started job is done; return ``(task_id, outcome)`` for every job done
        since the last call. A job whose worker died is reported with a :class:`WorkerLost` outcome."""

    def close(self) -> None:
        """Stop the workers and free what they share (shared memory, actors)."""


class ParallelPool(InProcessPool):
    """The in-process engine's order and clock, with each task run by ``runner``.

    ``window`` bounds the tasks started ahead of the consumer (default: twice the runner's slots), so
    at most that many finished updates wait in memory for their turn.
    """

    def __init__(self, runner: TaskRunner, num_clients: int, systems: SystemsModel | None = None,
                 window: int | None = None) -> None:
        super().__init__(_remote_only, num_clients, systems)
        self.runner = runner
        self.window = window if window is not None else 2 * max(1, runner.slots)
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        self._in_flight: set[int] = set()
        self._done: dict[int, Outcome] = {}

    def results(self) -> Iterator[TaskResult]:
        while self._queue:
            self._fill()
            queued = heapq.heappop(self._queue)
            if self.systems is not None:
                self._now = max(self._now, queued.finish)
            if queued.failure is not None:
                outcome: Outcome = queued.failure
            else:
                while queued.task_id not in self._done:
                    if queued.task_id not in self._in_flight:  # a task submitted ahead of the window
                        self._start(queued)
                    self._done.update(self.runner.finished())
                self._in_flight.discard(queued.task_id)
                outcome = self._done.pop(queued.task_id)
            result = TaskResult(queued.task_id, queued.client_id, queued.kind, queued.version, outcome, self.clock())
            del queued, outcome
            yield result
            del result

    def _fill(self) -> None:
        """Start the next tasks in consumption order, up to ``window`` running or finished ahead."""
        ahead = len(self._in_flight)
        if ahead >= self.window:
            return
        for queued in heapq.nsmallest(self.window, self._queue):
            if ahead >= self.window:
                break
            if queued.failure is None and queued.task_id not in self._in_flight:
                self._start(queued)
                ahead += 1

    def _start(self, queued: _Queued) -> None:
        self.runner.start(Job(queued.task_id, queued.client_id, queued.kind, queued.config, queued.version,
                              queued.parameters))
        self._in_flight.add(queued.task_id)

    def close(self) -> None:
        super().close()
        self._in_flight.clear()
        self._done.clear()
        self.runner.close()


def _remote_only(client_id: str) -> Client:
    raise AssertionError("a ParallelPool runs clients on its runner, never in-process")

