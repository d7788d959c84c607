"""One round of secure aggregation over a networked pool: train + keys, shares, masked input, unmask.

The round loop calls :func:`secure_fit` instead of streaming plain updates when the strategy asks for
secure aggregation and the pool can carry protocol messages (``pool.exchange``). Each step is one
task per client; the server side of the protocol (:class:`SecAggServer`) validates every message,
and only the sum of the surviving clients' inputs is ever decoded. A client that fails or sends a
malformed message at any step is excluded with a logged reason; the round completes while at least
t clients remain, and otherwise fails with the global model unchanged and nothing revealed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from insitu.aggregation.base import AggregationAssumptionError
from insitu.client.api import Config, Metrics
from insitu.engines.base import Task
from insitu.params import Parameters
from insitu.privacy.distributed import DistributedDP, decode_distributed_sum
from insitu.privacy.secagg import codec
from insitu.privacy.secagg.messages import AdvertiseKeys, MaskedInput, ShareKeys, UnmaskResponse
from insitu.privacy.secagg.participant import MESSAGE, SESSION, STEP, message_parameters, protocol_keys
from insitu.privacy.secagg.protocol import SecAggServer
from insitu.privacy.secure import decode_secure_sum, weight_scale
from insitu.run.history import RoundRecord
from insitu.strategies.strategy import Aggregate, ServerState, Strategy

log = logging.getLogger("insitu")

Reject = Callable[[str, str, str], None]
"""(client id, stage, reason): records and logs one client's exclusion."""


def can_exchange(pool: Any) -> bool:
    """Whether ``pool`` carries protocol messages (``exchange``): the network engine does."""
    return callable(getattr(pool, "exchange", None))


@dataclass
class _Contributor:
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


def secure_fit(pool: Any, strategy: Strategy, server_round: int, parameters: Parameters, server_state: ServerState,
               tasks: Sequence[Task], record: RoundRecord, *, num_clients: int, session: int,
               reject: Reject) -> Aggregate:
    """Run the four protocol steps through ``pool.exchange`` and fold the decoded mean into the model.

    Raises :class:`~insitu.privacy.secagg.SecAggAbort` when fewer than t clients remain at some step.
    """
    settings = strategy.secure_aggregation
    assert settings is not None
    n = len(tasks)
    if n < 2:
        raise AggregationAssumptionError(f"secure aggregation needs at least 2 clients in a round, {n} selected: "
                                         "a sum of one is that client's update")
    protocol_id = {task.client_id: i + 1 for i, task in enumerate(tasks)}
    client_of = {i: cid for cid, i in protocol_id.items()}
    privacy = strategy.privacy
    distributed = isinstance(privacy, DistributedDP)
    config = settings.protocol_config(n, parameters.num_values + 1, session, integer=distributed)
    server = SecAggServer(config)
    public = protocol_keys(config)

    def step(name: str, expected: type, messages: dict[str, Config],
             params: Parameters | None = None) -> Iterator[tuple[str, _Contributor, Any]]:
        """Send one step's tasks; yield (client, its count and metrics, decoded message) for each usable answer.

        Nothing keeps a message once the consumer asks for the next: the masked vectors are model-sized.
        """
        step_tasks = [Task(cid, {**extra, STEP: name, SESSION: config.session}) for cid, extra in messages.items()]
        for cid, outcome in pool.exchange(params, step_tasks):
            if isinstance(outcome, BaseException):
                reject(cid, f"secagg {name}", f"{type(outcome).__name__}: {outcome}")
                continue
            reply = _Contributor(outcome.num_examples, dict(outcome.metrics))
            try:
                message = codec.decode(outcome.message, expected)
            except ValueError as error:
                reject(cid, f"secagg {name}", f"malformed message: {error}")
                continue
            finally:
                del outcome
            if message.client_id != protocol_id.get(cid):
                reject(cid, f"secagg {name}", f"message claims protocol id {message.client_id}, but this client "
                                              f"was assigned {protocol_id.get(cid)}")
                continue
            yield cid, reply, message
            del message

    def only_messages(replies: Iterator[tuple[str, _Contributor, Any]]) -> Iterator[Any]:
        for _, _, message in replies:
            yield message
            del message

    contributors: dict[str, _Contributor] = {}
    adverts = []
    train = {task.client_id: {**task.config, **public, "secagg_id": protocol_id[task.client_id]} for task in tasks}
    for cid, reply, message in step("train", AdvertiseKeys, train, parameters):
        if isinstance(reply.num_examples, bool) or not isinstance(reply.num_examples, int) or reply.num_examples < 0:
            reject(cid, "secagg train", f"num_examples must be a non-negative int, got {reply.num_examples!r}")
            continue
        contributors[cid] = reply
        record.clients[cid] = {"num_examples": reply.num_examples, **reply.metrics}
        adverts.append(message)
    try:
        broadcast = server.collect_keys(adverts)
        blob = message_parameters(codec.encode(broadcast))
        shares = step("share", ShareKeys, {client_of[a.client_id]: {MESSAGE: blob} for a in broadcast.keys})
        routed = server.route_shares(only_messages(shares))
        if isinstance(privacy, DistributedDP):  # each client clips, rounds and noises its own input
            plan = privacy.plan(server_state.privacy, num_clients, parameters.num_values)
            scaling: Config = {"secagg_clip_norm": plan.clip_norm, "secagg_dp_gamma": plan.gamma,
                               "secagg_dp_variance": plan.client_variance}
        elif privacy is not None:
            clip, noise_std, denominator = privacy.mechanism(server_state.privacy, num_clients)
            scaling = {"secagg_clip_norm": clip}
        else:
            top = max(contributors[client_of[u]].num_examples for u in routed)
            if top <= 0:
                raise AggregationAssumptionError("every client reported 0 training examples: nothing to average")
            scaling = {"secagg_weight_scale": weight_scale(top, settings.bound)}
        masked_tasks = {client_of[u]: {MESSAGE: message_parameters(codec.encode(r)), **scaling} for u, r in routed.items()}
        masked = step("masked", MaskedInput, masked_tasks)
        request = server.collect_masked(only_messages(masked))
        blob = message_parameters(codec.encode(request))
        answers = step("unmask", UnmaskResponse, {client_of[u]: {MESSAGE: blob} for u in request.survivors})
        total = server.unmask(only_messages(answers))
    finally:
        for u, reason in server.excluded.items():
            reject(client_of[u], "secagg", reason)
    survivors = server.survivors
    del server  # it holds the decoded sum as well
    if isinstance(privacy, DistributedDP):  # the decoded sum already carries the clients' noise
        mean, unclipped = decode_distributed_sum(total, plan), 0
    elif privacy is not None:
        mean, unclipped = decode_secure_sum(total, bound=settings.bound, dp=True, noise_std=noise_std,
                                            denominator=denominator, rng=privacy.noise_rng(server_state.privacy, "update"))
    else:
        mean, unclipped = decode_secure_sum(total, bound=settings.bound, dp=False)
    del total
    included = [client_of[u] for u in survivors]
    entries = [(contributors[c].num_examples, contributors[c].metrics) for c in included]
    log.info("round %d: securely aggregated %d of %d clients", server_round, len(included), n)
    return strategy.apply_mean_delta(parameters, server_state, mean, entries, unclipped=unclipped,
                                     num_clients=num_clients)
