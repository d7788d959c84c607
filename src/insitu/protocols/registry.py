"""Which round protocols exist: the server half a fit round runs, and the client halves by name."""

from __future__ import annotations

from insitu.client.api import Client
from insitu.engines.base import Engine
from insitu.protocols import plain, secagg
from insitu.protocols.base import ClientHandler, ClientPolicy, EnvelopeEngine, HandlerFactory, RoundProtocol
from insitu.protocols.envelope import Envelope
from insitu.strategies.strategy import Strategy

HANDLERS: dict[str, HandlerFactory] = {
    plain.FIT: plain.FitHandler,
    plain.EVALUATE: plain.EvaluateHandler,
    secagg.PROTOCOL: secagg.SecAggHandler,
}
"""Client halves by protocol name: the transport hands a task to the handler its envelope names."""


def register_handler(protocol: str, factory: HandlerFactory) -> HandlerFactory:
    """Route task envelopes naming ``protocol`` to the handlers ``factory(client, policy)`` builds (the
    client half of a round protocol; its server half is passed to ``Coordinator(protocol=...)``)."""
    known = HANDLERS.get(protocol)
    if known is not None and known is not factory:
        raise ValueError(f"a client handler for protocol {protocol!r} is already registered ({known!r})")
    HANDLERS[protocol] = factory
    return factory


def honours_noise_floor(factory: HandlerFactory) -> bool:
    """Whether ``factory``'s handlers declare they enforce ``ClientPolicy.min_noise_multiplier`` (a
    ``honours_noise_floor = True`` attribute on the factory, e.g. a handler class)."""
    return getattr(factory, "honours_noise_floor", False) is True


class RefusedUnderNoiseFloor:
    """Stands in for a protocol's handler on a client with a noise floor when the protocol does not declare
    it honours the floor: every task of that protocol fails on the client, naming why."""

    honours_noise_floor = True  # it refuses everything

    def __init__(self, protocol: str, floor: float) -> None:
        self.protocol, self.floor = protocol, floor

    def handle(self, task: Envelope) -> Envelope:
        raise ValueError(f"this client has --dp-min-noise {self.floor:g} and protocol {self.protocol!r} does not "
                         "declare it honours the floor (honours_noise_floor): refusing its task")


def client_handlers(client: Client, policy: ClientPolicy | None = None) -> dict[str, ClientHandler]:
    """One handler per registered protocol, serving ``client`` under ``policy``.

    Under a noise floor (``policy.min_noise_multiplier``) only the protocols whose factory declares
    ``honours_noise_floor = True`` are served; every other one is refused by name, so a plugin that
    never looks at the policy cannot let this client's data leave it un-noised."""
    policy = policy or ClientPolicy()
    floor = policy.min_noise_multiplier
    return {name: factory(client, policy) if floor is None or honours_noise_floor(factory)
            else RefusedUnderNoiseFloor(name, floor)
            for name, factory in HANDLERS.items()}


def fit_protocol(strategy: Strategy, engine: Engine) -> RoundProtocol:
    """The protocol a fit round runs: secure aggregation message by message when the strategy asks for
    it and the engine carries envelopes (the network); else the plain exchange (in simulation the
    strategy's reducer then runs secure aggregation in-process)."""
    if strategy.secure_aggregation is not None and isinstance(engine, EnvelopeEngine):
        return secagg.SecureAggregationProtocol()
    return plain.PlainExchange()
