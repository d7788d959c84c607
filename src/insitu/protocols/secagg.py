"""Secure aggregation as a round protocol: train + keys, shares, masked input, unmask (Bonawitz et al. 2017).

Server half (:class:`SecureAggregationProtocol`): each step is one envelope per client of protocol
``"secagg"``, its step named in ``step`` and its protocol message, encoded by
:mod:`~insitu.privacy.secagg.codec`, in the envelope's opaque bytes. :class:`SecAggServer` validates
every message and only the sum of the surviving clients' inputs is ever decoded. A client that fails or
sends a malformed message at any step is excluded with a logged reason; the round completes while at
least t clients remain, and otherwise fails with the global model unchanged and nothing revealed.

Client half (:class:`SecAggHandler`): "train" runs the user's unchanged ``Client.fit`` on the task's
parameters and config (the round's public parameters travel apart, as a :class:`RoundSetup` message)
and keeps the update on the client, answering with fresh public keys; "share", "masked" and "unmask"
answer the protocol's messages. Only the masked vector, encrypted shares and the shares the protocol
reveals leave the client; the update itself never does.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from insitu.aggregation.base import AggregationAssumptionError
from insitu.client.api import Client, Metrics
from insitu.engines.base import Engine
from insitu.params import describe_mismatch
from insitu.privacy.distributed import (
    DistributedDP,
    check_field,
    distributed_input,
    os_entropy_rng,
)
from insitu.privacy.secagg import codec
from insitu.privacy.secagg.messages import (
    CLIPPED,
    NOISED,
    WEIGHTED,
    AdvertiseKeys,
    InputRequest,
    KeyBroadcast,
    MaskedInput,
    RoundSetup,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from insitu.privacy.secagg.protocol import SecAggClient, SecAggConfig, SecAggRefused, SecAggServer
from insitu.privacy.secure import secure_input, weight_scale
from insitu.protocols.base import ClientPolicy, EnvelopeEngine, FitRound
from insitu.protocols.envelope import Envelope, Expect
from insitu.protocols.plain import task_config, task_envelope
from insitu.run.validation import numeric_metrics
from insitu.strategies.strategy import Aggregate

log = logging.getLogger("insitu")

PROTOCOL = "secagg"
STEPS = ("train", "share", "masked", "unmask")
CONTROL_BYTES_PER_CLIENT = 512  # a key advert, an encrypted share pair or a revealed share, per peer
CONTROL_SLACK_BYTES = 1024

Message = TypeVar("Message")


def control_bytes(n: int) -> int:
    """Most bytes of a key, share or unmask reply in a round of ``n`` clients."""
    return CONTROL_SLACK_BYTES + CONTROL_BYTES_PER_CLIENT * n


def masked_bytes(dim: int) -> int:
    """Most bytes of a masked input of ``dim`` values (4 bytes each, in Z_2^32)."""
    return CONTROL_SLACK_BYTES + 4 * dim


@dataclass
class _Contributor:
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


class SecureAggregationProtocol:
    """The server learns only the sum of the round's (weighted, clipped or noised) updates."""

    name: str = PROTOCOL

    def fit(self, engine: Engine, round_: FitRound) -> Aggregate:
        """Run the four steps through ``engine.exchange`` and fold the decoded mean into the model.

        Raises :class:`~insitu.privacy.secagg.SecAggAbort` when fewer than t clients remain at some step."""
        if not isinstance(engine, EnvelopeEngine):
            raise TypeError(f"{type(engine).__name__} does not carry protocol envelopes: secure aggregation runs "
                            "in-process through the strategy's reducer there")
        strategy, parameters, tasks, reject = round_.strategy, round_.parameters, round_.tasks, round_.reject
        settings = strategy.secure_aggregation
        assert settings is not None
        n = len(tasks)
        if n < 2:
            raise AggregationAssumptionError(f"secure aggregation needs at least 2 clients in a round, {n} selected: "
                                             "a sum of one is that client's update")
        protocol_id = {task.client_id: i + 1 for i, task in enumerate(tasks)}
        client_of = {i: cid for cid, i in protocol_id.items()}
        privacy, state = strategy.privacy, round_.server_state
        distributed = isinstance(privacy, DistributedDP)
        config = settings.protocol_config(n, parameters.num_values + 1, secrets.randbits(63), integer=distributed)
        server = SecAggServer(config)
        control = Expect(message_bytes=control_bytes(n))

        def step(name: str, expected: type[Message], envelopes: dict[str, Envelope],
                 expect: Expect) -> Iterator[tuple[str, _Contributor, Message]]:
            """Send one step's envelopes; yield (client, its count and metrics, decoded message) for each
            usable answer.

            Nothing keeps a message once the consumer asks for the next: the masked vectors are model-sized."""
            for cid, outcome in engine.exchange(list(envelopes.items()), expect):
                if isinstance(outcome, BaseException):
                    reject(cid, f"secagg {name}", f"{type(outcome).__name__}: {outcome}", outcome)
                    continue
                try:
                    message = codec.decode(outcome.message, expected)
                except ValueError as error:
                    reject(cid, f"secagg {name}", f"malformed message: {error}", None)
                    continue
                if message.client_id != protocol_id.get(cid):
                    reject(cid, f"secagg {name}", f"message claims protocol id {message.client_id}, but this client "
                                                  f"was assigned {protocol_id.get(cid)}", None)
                    continue
                reply = _Contributor(outcome.num_examples, dict(outcome.metrics))
                del outcome
                yield cid, reply, message
                del message

        def only_messages(replies: Iterator[tuple[str, _Contributor, Message]]) -> Iterator[Message]:
            for _, _, message in replies:
                yield message
                del message

        def envelope(name: str, message: Any) -> Envelope:
            return Envelope(PROTOCOL, name, round_.server_round, round_.server_round - 1, message=codec.encode(message))

        contributors: dict[str, _Contributor] = {}
        adverts = []
        train = {}
        for task in tasks:  # a fit task (the global model, the round's config) plus the round's public setup
            setup = RoundSetup(config.session, protocol_id[task.client_id], n, config.t, config.dim, config.bound,
                               config.degree or 0, int(config.integer))
            fit = task_envelope("fit", parameters, round_.server_round - 1, task.config)
            train[task.client_id] = dataclasses.replace(fit, protocol=PROTOCOL, step="train", message=codec.encode(setup))
        for cid, reply, advert in step("train", AdvertiseKeys, train, Expect(message_bytes=control_bytes(n),
                                                                               training=True)):
            contributors[cid] = reply
            round_.record.clients[cid] = {**numeric_metrics(reply.metrics), "num_examples": reply.num_examples}
            adverts.append(advert)
        del train
        try:
            keys = server.collect_keys(adverts)
            broadcast = envelope("share", keys)
            shares = step("share", ShareKeys, {client_of[a.client_id]: broadcast for a in keys.keys}, control)
            routed = server.route_shares(only_messages(shares))
            if isinstance(privacy, DistributedDP):  # each client clips, rounds and noises its own input
                plan = privacy.plan(state.privacy, round_.num_clients, parameters.num_values)
                rule = functools.partial(InputRequest, kind=NOISED, weight_scale=0.0, clip_norm=plan.clip_norm,
                                         gamma=plan.gamma, variance=plan.client_variance)
            elif privacy is not None:  # each client clips; the server noises the decoded sum
                rule = functools.partial(InputRequest, kind=CLIPPED, weight_scale=0.0,
                                         clip_norm=float(state.privacy["clip_norm"][0]), gamma=0.0, variance=0.0)
            else:
                top = max(contributors[client_of[u]].num_examples for u in routed)
                if top <= 0:
                    raise AggregationAssumptionError("every client reported 0 training examples: nothing to average")
                rule = functools.partial(InputRequest, kind=WEIGHTED, weight_scale=weight_scale(top, settings.bound),
                                         clip_norm=0.0, gamma=0.0, variance=0.0)
            requests = {client_of[u]: envelope("masked", rule(r)) for u, r in routed.items()}
            masked = step("masked", MaskedInput, requests, Expect(message_bytes=masked_bytes(config.dim)))
            request = server.collect_masked(only_messages(masked))
            unmask = envelope("unmask", request)
            answers = step("unmask", UnmaskResponse, {client_of[u]: unmask for u in request.survivors}, control)
            total = server.unmask(only_messages(answers))
        finally:
            for u, reason in server.excluded.items():
                reject(client_of[u], "secagg", reason, None)
        included = [client_of[u] for u in server.survivors]
        del server  # it holds the decoded sum as well
        entries = [(contributors[c].num_examples, contributors[c].metrics) for c in included]
        log.info("round %d: securely aggregated %d of %d clients", round_.server_round, len(included), n)
        return strategy.aggregate_secure_sum(parameters, state, total, entries, num_clients=round_.num_clients)


@dataclass
class _Round:
    session: int
    protocol: SecAggClient
    delta: np.ndarray | None
    num_examples: int


class SecAggHandler:
    """Client half of secure aggregation; one round at a time (a new "train" step replaces it).

    With ``policy.min_noise_multiplier`` z, this client takes part only under distributed DP whose
    noise, if every client it can verify adds its share, is at least z times the scaled clip norm
    (sqrt(k v) >= z gamma C for each client adding variance v, where k counts this client and the
    clients whose encrypted key shares reached it: never the server's claimed n, which under SecAgg+
    this client cannot check). It then refuses any other masked
    input, and sends neither its example count nor its metrics in the clear: a guard against a server
    that would ask for less noise than announced. Its own share is always added, whatever the others do.
    """

    honours_noise_floor: ClassVar[bool] = True  # checked in _input / _distributed_input

    def __init__(self, client: Client, policy: ClientPolicy) -> None:
        self.client = client
        self.min_noise_multiplier = policy.min_noise_multiplier
        self._round: _Round | None = None

    def handle(self, task: Envelope) -> Envelope:
        """Answer one step of a secure round; protocol refusals raise :class:`SecAggRefused`."""
        if task.step == "train":
            advert, num_examples, metrics = self._train(task)
            return self._reply(task, advert, num_examples, metrics)
        if task.step not in STEPS:
            raise ValueError(f"unknown secure-aggregation step {task.step!r}; expected one of {STEPS}")
        current = self._round
        if current is None:
            raise SecAggRefused("no secure round in progress on this client (it may have restarted since training); "
                                "it sits this round out")
        protocol = current.protocol
        if task.step == "share":
            reply: Any = protocol.share_keys(codec.decode(task.message, KeyBroadcast))
        elif task.step == "masked":
            request = codec.decode(task.message, InputRequest)
            reply = protocol.masked_input(request.shares, self._input(current, request))
            current.delta = None
        else:
            reply = protocol.unmask(codec.decode(task.message, UnmaskRequest))
            self._round = None
        return self._reply(task, reply)

    @staticmethod
    def _reply(task: Envelope, message: Any, num_examples: int = 0, metrics: Metrics | None = None) -> Envelope:
        return Envelope(PROTOCOL, task.step, task.round, task.model_version, message=codec.encode(message),
                        num_examples=num_examples, metrics=metrics or {})

    def _train(self, task: Envelope) -> tuple[AdvertiseKeys, int, Metrics]:
        """Train, keep the update here, and answer with fresh keys (plus the count and metrics, unless this
        client sends nothing about its data un-noised)."""
        if task.parameters is None:
            raise ValueError("the secure-aggregation train step needs the global parameters")
        parameters = task.parameters
        setup = codec.decode(task.message, RoundSetup)
        config = SecAggConfig(setup.n, setup.t, setup.dim, setup.bound, session=setup.session,
                              degree=setup.degree or None, integer=bool(setup.integer))
        if config.dim != parameters.num_values + 1:
            raise ValueError(f"secure round over {config.dim} values for a model of {parameters.num_values} "
                             "(expected one more, for the weight)")
        protocol = SecAggClient(setup.client_id, config)
        self._round = None
        result = self.client.fit(parameters, task_config(task))
        mismatch = describe_mismatch(result.parameters.specs, parameters.specs)
        if mismatch:
            raise ValueError(f"the client's update does not match the global model: {mismatch}")
        if result.extras:
            raise ValueError(f"secure aggregation hides only the update, but fit returned extras "
                             f"{sorted(result.extras)} that would have to travel in the clear")
        delta = result.parameters.flat() - parameters.flat()
        self._round = _Round(config.session, protocol, delta, int(result.num_examples))
        advert = protocol.advertise_keys()
        if self.min_noise_multiplier is not None:  # nothing about this client's data leaves it un-noised
            return advert, 0, {}
        return advert, int(result.num_examples), dict(result.metrics)

    def _input(self, current: _Round, request: InputRequest) -> np.ndarray:
        """This client's protocol input, as the request's kind says."""
        assert current.delta is not None
        bound = current.protocol.config.bound
        if request.kind == NOISED:
            return self._distributed_input(current, request)
        if self.min_noise_multiplier is not None:
            raise ValueError(f"this client takes part only under distributed DP (noise multiplier >= "
                             f"{self.min_noise_multiplier:g}), but the server asked for a masked input without "
                             "client noise")
        if request.kind == CLIPPED:
            if not request.clip_norm > 0:
                raise ValueError(f"a clipped input needs a clip norm > 0, got {request.clip_norm}")
            return secure_input(current.delta, bound=bound, clip_norm=request.clip_norm)
        if request.kind == WEIGHTED:
            if not request.weight_scale > 0:
                raise ValueError(f"a weighted input needs a weight scale > 0, got {request.weight_scale}")
            return secure_input(current.delta, bound=bound, weight=current.num_examples * request.weight_scale)
        raise ValueError(f"unknown masked-input kind {request.kind}; expected {WEIGHTED} (weighted), {CLIPPED} "
                         f"(clipped) or {NOISED} (noised)")

    def _distributed_input(self, current: _Round, request: InputRequest) -> np.ndarray:
        """Distributed DP: clip, scale, round and add this client's Skellam noise share, all here.

        The noise always comes from this machine's OS entropy (never a seed from the server). The server's
        numbers are checked: an integer round, a positive noise variance, and a sum that fits the field.
        """
        assert current.delta is not None
        config = current.protocol.config
        if not config.integer:
            raise ValueError("distributed DP needs an integer secure round")
        clip, gamma, variance = request.clip_norm, request.gamma, request.variance
        if not (variance > 0 and gamma > 0 and clip > 0):
            raise ValueError(f"distributed DP: refusing clip {clip}, gamma {gamma}, noise variance {variance} "
                             "(each must be > 0: a client always adds its noise share)")
        if self.min_noise_multiplier is not None:
            # Count only the shares this client can vouch for: itself plus the group members whose encrypted
            # shares reached it, never the n the server claims (under SecAgg+ a client sees only its group,
            # so a server could claim n = 100,000 and scale each share down to match).
            verified = len(current.protocol.sharers(request.shares))
            planned = math.sqrt(verified * variance) / (gamma * clip)
            if planned < self.min_noise_multiplier:
                raise ValueError(f"distributed DP: the server's noise, {planned:.3g} x the clip norm with the "
                                 f"{verified} shares this client can verify (itself and the clients whose key "
                                 f"shares reached it; the server claims {config.n}), is below this client's "
                                 f"minimum {self.min_noise_multiplier:g}: refusing to take part")
        check_field(config.n, gamma, clip, variance, current.delta.size)
        return distributed_input(current.delta, clip_norm=clip, gamma=gamma, client_variance=variance,
                                 rng=os_entropy_rng())
