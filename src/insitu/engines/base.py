"""The Engine contract: a stream of client tasks, whatever the transport.

An engine is handed tasks (``submit``) and streams back their results (``results``) in the order
they complete, each tagged with its task id and the version of the global model it was given.
Nothing in an engine knows about rounds: a synchronous round (``run_tasks``), FedBuff's buffer and a
deadline are policies written once on top of this stream, so they run unchanged in-process, over
gRPC, and on any engine added later.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from insitu.client.api import Config, EvalResult, FitResult
from insitu.params import Parameters

TaskKind = Literal["fit", "evaluate"]


@dataclass(frozen=True)
class Task:
    """One client's assignment: who, and with which config."""

    client_id: str
    config: Config


class NotEnoughClientsError(RuntimeError):
    """Fewer clients are available than the strategy requires (or connected within the wait)."""


Outcome = FitResult | EvalResult | BaseException
"""A task's result, or the exception that stands for its failure."""


@dataclass
class TaskResult:
    """What came back for one submitted task.

    ``outcome`` is the client's result, or the exception that stands for its failure (a failure is
    reported, never raised, so one bad client cannot stop the run). ``model_version`` is the version
    passed to ``submit`` with the parameters the task was given: an asynchronous policy measures
    staleness with it. ``finished_at`` is the engine's clock when the result became available:
    simulated seconds for an engine with a systems model, else wall-clock seconds since it started.
    """

    task_id: int
    client_id: str
    kind: str  # "fit" or "evaluate"; an engine carrying protocol envelopes reports the protocol's name
    model_version: int
    outcome: Outcome
    finished_at: float = 0.0


class Engine(Protocol):
    """In-process, multi-process, Ray or gRPC: every policy needs only these calls."""

    def wait_for(self, num_clients: int, timeout: float | None) -> Sequence[str]:
        """Block until at least ``num_clients`` are available (or timeout); return their ids (any sequence:
        the in-process engine's is lazy, so a million clients cost nothing per round)."""

    def submit(self, kind: TaskKind, parameters: Parameters, model_version: int,
               tasks: Sequence[Task]) -> list[int]:
        """Queue ``tasks`` with ``parameters`` (not copied: the caller must not change them in place while
        the tasks are outstanding) and return their task ids, in the order of ``tasks``."""

    def results(self) -> Iterator[TaskResult]:
        """Yield the result of every outstanding task as it completes, then stop.

        Tasks submitted while the iterator runs are included. The consumer should drop each result
        before asking for the next one (the engine may reuse its memory, and a remote engine
        decodes the next upload only then)."""

    def outstanding(self) -> int:
        """Tasks submitted whose result has not been yielded yet."""

    def clock(self) -> float:
        """The engine's time in seconds: simulated under a systems model, else wall-clock since start."""

    def close(self) -> None: ...


def run_tasks(engine: Engine, kind: TaskKind, parameters: Parameters, model_version: int,
              tasks: Sequence[Task]) -> Iterator[tuple[str, Outcome]]:
    """The synchronous round's exchange: submit ``tasks`` and yield ``(client_id, outcome)`` for
    each as it completes, until all are back. Nothing else may be outstanding on ``engine``."""
    if engine.outstanding():
        raise RuntimeError(f"{engine.outstanding()} task(s) are still outstanding: a synchronous round needs an "
                           "idle engine (drain the asynchronous policy's tasks first)")
    engine.submit(kind, parameters, model_version, tasks)
    for result in engine.results():
        client_id, outcome = result.client_id, result.outcome
        del result
        yield client_id, outcome
        del outcome  # hold no update while the next one is fetched
