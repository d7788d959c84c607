"""The ClientPool contract: how the round loop reaches clients, whatever the transport."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, Union

from insitu.client.api import Config, EvalResult, FitResult
from insitu.params import Parameters


@dataclass(frozen=True)
class Task:
    """One client's assignment for a round: who, and with which config."""

    client_id: str
    config: Config


class NotEnoughClientsError(RuntimeError):
    """Fewer clients are available than the strategy requires (or connected within the wait)."""


FitOutcome = Union[FitResult, BaseException]
EvalOutcome = Union[EvalResult, BaseException]


class ClientPool(Protocol):
    """In-process, Ray or gRPC: the loop only needs these calls.

    ``fit``/``evaluate`` yield each client's outcome as soon as it is known, in any order; a failure
    is yielded as the exception, never raised, so one bad client cannot stop a round.

    A pool that can also carry multi-message protocols offers ``exchange(parameters | None, tasks)``,
    yielding ``(cid, ProtocolReply | exception)``; the round loop then runs secure aggregation's
    steps through it (``run/secure_round.py``). In-process pools run that protocol inside a reducer.
    """

    def wait_for(self, num_clients: int, timeout: float | None) -> list[str]:
        """Block until at least ``num_clients`` are connected (or timeout); return their ids."""

    def fit(self, parameters: Parameters, tasks: Sequence[Task]) -> Iterator[tuple[str, FitOutcome]]: ...

    def evaluate(self, parameters: Parameters, tasks: Sequence[Task]) -> Iterator[tuple[str, EvalOutcome]]: ...

    def close(self) -> None: ...
