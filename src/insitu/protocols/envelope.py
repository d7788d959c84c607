"""The one message type of every round protocol, in both directions, and what a reply may carry.

A task (server -> client) and its reply (client -> server) are both an :class:`Envelope`: which
protocol and step it belongs to, the round and model version, and a typed body (parameters, named
arrays, opaque protocol bytes, scalar config, and a reply's example count, loss and metrics). The
transport (``insitu.net``, the gRPC engine) moves envelopes and enforces sizes, authentication and
rate limits; it never looks at ``protocol`` except to hand a task to the client's handler of that
name. What a reply may declare is not the transport's guess from the protocol's name either: the
protocol states it with each task as an :class:`Expect`, which the server enforces from the reply's
header, before a byte of its body is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from insitu.client.api import Metrics, Scalar
from insitu.params import Parameters


@dataclass
class Envelope:
    """One protocol message: a task or a reply.

    ``config`` holds scalars only (JSON on the wire); arrays travel by name in ``arrays`` (a task's
    server control variate, a result's extras), never as key prefixes. ``message`` is opaque to
    everyone but the protocol (secure aggregation's encoded messages). ``num_examples``, ``loss`` and
    ``metrics`` are a reply's; a task leaves them empty.
    """

    protocol: str
    step: str = ""
    round: int = 0
    model_version: int = 0
    config: dict[str, Scalar] = field(default_factory=dict)
    parameters: Parameters | None = None
    arrays: dict[str, Parameters] = field(default_factory=dict)
    message: bytes = b""
    num_examples: int = 0
    loss: float = 0.0
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True)
class Expect:
    """What a reply to one task may carry; anything else is refused from the reply's header.

    ``parameters``: the reply must carry parameters shaped like the task's model. ``arrays``: the
    named arrays it may carry, each at most the model's size. ``message_bytes``: the most opaque
    protocol bytes it may carry (the engine refuses a declaration beyond what the model's size
    justifies). ``training``: its example count weighs a training update, so it is capped by the
    previous round's median count and counts towards this round's.
    """

    parameters: bool = False
    arrays: frozenset[str] = frozenset()
    message_bytes: int = 0
    training: bool = False
