"""In-process engine: many virtual clients, one process, called one after another.

Clients are built on demand by ``client_fn`` and dropped after their call, so memory grows with the
number of clients only by what ``client_fn`` itself keeps (typically one index array each).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from insitu.client.api import Client
from insitu.engines.base import EvalOutcome, FitOutcome, NotEnoughClientsError, Task
from insitu.params import Parameters

ClientFn = Callable[[str], Client]


class InProcessPool:
    """``num_clients`` virtual clients with ids "0" .. "N-1", created by ``client_fn(cid)``."""

    def __init__(self, client_fn: ClientFn, num_clients: int) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.client_fn = client_fn
        self.client_ids = [str(i) for i in range(num_clients)]

    def wait_for(self, num_clients: int, timeout: float | None = None) -> list[str]:
        if num_clients > len(self.client_ids):
            raise NotEnoughClientsError(
                f"the strategy needs {num_clients} available clients but the simulation has "
                f"{len(self.client_ids)}: raise num_clients or lower min_available_clients/min_fit_clients"
            )
        return list(self.client_ids)

    def fit(self, parameters: Parameters, tasks: Sequence[Task]) -> Iterator[tuple[str, FitOutcome]]:
        for task in tasks:
            try:
                yield task.client_id, self.client_fn(task.client_id).fit(parameters, task.config)
            except Exception as error:  # a failing client is reported, never fatal
                yield task.client_id, error

    def evaluate(self, parameters: Parameters, tasks: Sequence[Task]) -> Iterator[tuple[str, EvalOutcome]]:
        for task in tasks:
            try:
                yield task.client_id, self.client_fn(task.client_id).evaluate(parameters, task.config)
            except Exception as error:
                yield task.client_id, error

    def close(self) -> None:
        pass
