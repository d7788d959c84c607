"""In-process engine: many virtual clients, one process, called one after another.

Clients are built on demand by ``client_fn`` and dropped after their call, so memory grows with the
number of clients only by what ``client_fn`` itself keeps (typically one index array each). The ids
themselves are a lazy :class:`ClientIds` sequence: a million clients cost nothing per round until some
are sampled.

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
from typing import overload

from insitu.client.api import Client
from insitu.engines.base import NotEnoughClientsError, Outcome, Task, TaskKind, TaskResult
from insitu.engines.systems import SystemsModel
from insitu.params import Parameters

ClientFn = Callable[[str], Client]


class ClientIds(Sequence[str]):
    """The ids "0" .. "N-1" as a read-only sequence computed on access: O(1) memory and time whatever N
    (``wait_for`` hands it out every round; sampling indexes only the ids it draws)."""

    __slots__ = ("_n",)

    def __init__(self, num_clients: int) -> None:
        self._n = num_clients

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [str(i) for i in range(*index.indices(self._n))]
        i = index.__index__()
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"client index {index} out of range for {self._n} clients")
        return str(i)

    def __iter__(self) -> Iterator[str]:
        return map(str, range(self._n))

    def __contains__(self, value: object) -> bool:
        return self._position(value) is not None

    def index(self, value: object, start: int = 0, stop: int | None = None) -> int:
        i = self._position(value)
        if i is None or not start <= i < (self._n if stop is None else stop):
            raise ValueError(f"{value!r} is not a client id here")
        return i

    def count(self, value: object) -> int:
        return int(value in self)

    def _position(self, value: object) -> int | None:
        if not isinstance(value, str) or not value.isascii() or not value.isdigit() or str(int(value)) != value:
            return None  # only the canonical spelling: "7", never "07" or "+7"
        i = int(value)
        return i if i < self._n else None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ClientIds):
            return self._n == other._n
        if isinstance(other, (list, tuple)):
            return len(other) == self._n and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # compares equal to a list, which is unhashable

    def __repr__(self) -> str:
        return f"ClientIds({self._n})"


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
        self.client_ids = ClientIds(num_clients)
        self.systems = systems
        self._queue: list[_Queued] = []
        self._ids = itertools.count()
        self._started = time.perf_counter()
        self._now = 0.0  # simulated seconds (systems model only)
        self._unnumbered: dict[str, int] = {}  # fit tasks without a round, per client (see _draw_index)

    def wait_for(self, num_clients: int, timeout: float | None = None) -> Sequence[str]:
        """Every client, always there: the same lazy :class:`ClientIds` each call (nothing copied)."""
        if num_clients > len(self.client_ids):
            raise NotEnoughClientsError(
                f"the strategy needs {num_clients} available clients but the simulation has "
                f"{len(self.client_ids)}: raise num_clients or lower min_available_clients/min_fit_clients"
            )
        return self.client_ids

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
