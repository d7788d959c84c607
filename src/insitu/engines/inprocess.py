"""In-process engine: many virtual clients, one process, called one after another.

Clients are built on demand by ``client_fn`` and dropped after their call, so memory grows with the
number of clients only by what ``client_fn`` itself keeps (typically one index array each).

Tasks run lazily: a task is trained only when ``results`` reaches it, on the parameters it was
submitted with. Without a systems model tasks complete in submission order and ``clock`` is wall
time. With one (``SystemsModel``), each task gets a simulated duration when it is submitted and
results come back in order of simulated finish time, so an asynchronous policy sees fast clients
overtake slow ones exactly as it would in a deployment, while the computation stays sequential and
deterministic.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from insitu.client.api import Client
from insitu.engines.base import NotEnoughClientsError, Outcome, Task, TaskKind, TaskResult
from insitu.engines.systems import SystemsModel
from insitu.params import Parameters

ClientFn = Callable[[str], Client]


@dataclass(order=True)
class _Queued:
    finish: float
    task_id: int
    client_id: str = field(compare=False)
    kind: TaskKind = field(compare=False)
    config: dict = field(compare=False)  # type: ignore[type-arg]
    version: int = field(compare=False)
    parameters: Parameters = field(compare=False)
    failure: BaseException | None = field(compare=False, default=None)


class InProcessPool:
    """``num_clients`` virtual clients with ids "0" .. "N-1", created by ``client_fn(cid)``.

    ``systems`` (optional) simulates per-client speed, latency, stragglers and dropouts; ``clock``
    then reports simulated seconds.
    """

    def __init__(self, client_fn: ClientFn, num_clients: int, systems: SystemsModel | None = None) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.client_fn = client_fn
        self.client_ids = [str(i) for i in range(num_clients)]
        self.systems = systems
        self._queue: list[_Queued] = []
        self._ids = itertools.count()
        self._started = time.perf_counter()
        self._now = 0.0  # simulated seconds (systems model only)
        self._unnumbered: dict[str, int] = {}  # fit tasks without a round, per client (see _draw_index)

    def wait_for(self, num_clients: int, timeout: float | None = None) -> list[str]:
        if num_clients > len(self.client_ids):
            raise NotEnoughClientsError(
                f"the strategy needs {num_clients} available clients but the simulation has "
                f"{len(self.client_ids)}: raise num_clients or lower min_available_clients/min_fit_clients"
            )
        return list(self.client_ids)

    def submit(self, kind: TaskKind, parameters: Parameters, model_version: int, tasks: Sequence[Task]) -> list[int]:
        ids = []
        for task in tasks:
            task_id = next(self._ids)
            config, finish, failure = dict(task.config), float(task_id), None
            if self.systems is not None:
                if kind == "fit":
                    plan = self.systems.plan(task.client_id, config, self._draw_index(task))
                    config, failure = dict(plan.config), plan.failure
                    finish = self._now + plan.duration
                else:  # evaluation is not part of the training timeline
                    finish = self._now
            heapq.heappush(self._queue, _Queued(finish, task_id, task.client_id, kind, config, model_version,
                                                parameters, failure))
            ids.append(task_id)
        return ids

    def _draw_index(self, task: Task) -> int:
        """Which of the systems model's draws a fit task gets: its round (a client has at most one fit task
        per round, or per server step under FedBuff), so a plan does not depend on other tasks, such as
        evaluations; tasks without a round are counted per client, above any round number."""
        round_ = task.config.get("round")
        if isinstance(round_, int) and not isinstance(round_, bool):
            return round_
        index = self._unnumbered.get(task.client_id, 0)
        self._unnumbered[task.client_id] = index + 1
        return (1 << 32) + index  # never a round number

    def results(self) -> Iterator[TaskResult]:
        while self._queue:
            queued = heapq.heappop(self._queue)
            if self.systems is not None:
                self._now = max(self._now, queued.finish)
            outcome = queued.failure if queued.failure is not None else self._run(queued)
            result = TaskResult(queued.task_id, queued.client_id, queued.kind, queued.version, outcome, self.clock())
            del queued, outcome
            yield result
            del result

    def _run(self, queued: _Queued) -> Outcome:
        try:
            client = self.client_fn(queued.client_id)
            if queued.kind == "fit":
                return client.fit(queued.parameters, queued.config)
            return client.evaluate(queued.parameters, queued.config)
        except Exception as error:  # noqa: BLE001 - a failing client is reported, never fatal
            return error

    def outstanding(self) -> int:
        return len(self._queue)

    def clock(self) -> float:
        return self._now if self.systems is not None else time.perf_counter() - self._started

    def close(self) -> None:
        self._queue.clear()
