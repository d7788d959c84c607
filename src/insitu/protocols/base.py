"""Round protocols as plugins: a server half that drives one fit round over an engine, and client
halves looked up by the protocol's name.

The round loop asks :func:`~insitu.protocols.registry.fit_protocol` which protocol a round runs and
hands it a :class:`FitRound`; the protocol submits tasks, validates what comes back, aggregates, and
returns the strategy's :class:`~insitu.strategies.strategy.Aggregate`. On a client, the transport
hands every task envelope to the :class:`ClientHandler` registered under the envelope's ``protocol``
(:func:`~insitu.protocols.registry.client_handlers`) and sends back the reply envelope it returns.
Neither the transport nor the loop knows any protocol by name: a new protocol is a server class plus
a handler factory in the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from insitu.client.api import Client
from insitu.engines.base import Engine, Task
from insitu.params import Parameters
from insitu.protocols.envelope import Envelope, Expect
from insitu.run.history import RoundRecord
from insitu.strategies.strategy import Aggregate, ServerState, Strategy

Reject = Callable[[str, str, str, object], None]
"""(client id, stage, reason, outcome): records and logs one client's exclusion from the round; the
outcome (its result or failure) tells a simulated dropout from a refusal."""


@dataclass
class FitRound:
    """What the round loop hands a protocol for one fit round."""

    strategy: Strategy
    server_round: int
    parameters: Parameters
    server_state: ServerState
    tasks: Sequence[Task]  # one per selected client, with its fit config
    record: RoundRecord  # the protocol records per-client facts (counts, metrics) in it
    num_clients: int  # clients available this round (DP's and SCAFFOLD's N)
    reject: Reject


class RoundProtocol(Protocol):
    """The server half of a round protocol: one fit round over ``engine``, to the strategy's aggregate.

    Raises :class:`~insitu.aggregation.base.AggregationAssumptionError` (or the protocol's own abort)
    when the round cannot release anything; the loop then records it as failed."""

    name: str

    def fit(self, engine: Engine, round_: FitRound) -> Aggregate: ...


@runtime_checkable
class EnvelopeEngine(Protocol):
    """An engine that carries any protocol's envelopes (the gRPC engine): multi-step protocols need it."""

    def exchange(self, envelopes: Sequence[tuple[str, Envelope]],
                 expect: Expect) -> Iterator[tuple[str, Envelope | BaseException]]: ...


@dataclass(frozen=True)
class ClientPolicy:
    """What a client itself insists on, whatever the server asks.

    ``min_noise_multiplier`` z: take part only in distributed-DP secure rounds whose noise, with the
    shares of every participant this client can verify (itself and those whose key shares reached it),
    is at least z times the scaled clip norm; refuse every other task, which would let something about
    this client's data leave it un-noised. Only handlers whose factory declares
    ``honours_noise_floor = True`` are served under a floor (:func:`insitu.protocols.registry.client_handlers`)."""

    min_noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        if self.min_noise_multiplier is not None and not self.min_noise_multiplier > 0:
            raise ValueError(f"min_noise_multiplier must be > 0, got {self.min_noise_multiplier}")


class ClientHandler(Protocol):
    """The client half of a round protocol: answer one task envelope with a reply envelope.

    An exception is reported to the server as this client's failure of the task."""

    def handle(self, task: Envelope) -> Envelope: ...


HandlerFactory = Callable[[Client, ClientPolicy], ClientHandler]
