"""Which round protocols exist: the server half a fit round runs, and the client halves by name."""

from __future__ import annotations

from insitu.client.api import Client
from insitu.engines.base import Engine
from insitu.protocols import plain, secagg
from insitu.protocols.base import ClientHandler, ClientPolicy, EnvelopeEngine, HandlerFactory, RoundProtocol
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


def client_handlers(client: Client, policy: ClientPolicy | None = None) -> dict[str, ClientHandler]:
    """One handler per registered protocol, serving ``client`` under ``policy``."""
    policy = policy or ClientPolicy()
    return {name: factory(client, policy) for name, factory in HANDLERS.items()}


def fit_protocol(strategy: Strategy, engine: Engine) -> RoundProtocol:
    """The protocol a fit round runs: secure aggregation message by message when the strategy asks for
    it and the engine carries envelopes (the network); else the plain exchange (in simulation the
    strategy's reducer then runs secure aggregation in-process)."""
    if strategy.secure_aggregation is not None and isinstance(engine, EnvelopeEngine):
        return secagg.SecureAggregationProtocol()
    return plain.PlainExchange()
