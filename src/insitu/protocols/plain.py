"""The plain exchange: every selected client trains on the global model and sends its update back.

Server half: :class:`PlainExchange` submits one fit task per client, validates every result as it
arrives (:func:`accepted_fits`) and streams the usable ones into the strategy's aggregation, so the
server holds one update at a time. Client halves: :class:`FitHandler` and :class:`EvaluateHandler`
run the user's unchanged ``Client.fit``/``Client.evaluate``. On the wire a task is an envelope of
protocol ``"fit"`` or ``"evaluate"`` carrying the parameters, the scalar config, and array-valued
config entries by name (SCAFFOLD's server control variate); a fit reply carries the new parameters
and the extras a client algorithm returns (SCAFFOLD's ``scaffold_delta_c``), nothing else.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import ClassVar, Literal

from insitu.algorithms import ALGORITHM, ALGORITHMS, LocalSGD, result_extras
from insitu.client.api import Client, Config, EvalResult, FitResult
from insitu.engines.base import Engine, Outcome, TaskKind, run_tasks
from insitu.params import Parameters
from insitu.protocols.base import ClientPolicy, FitRound
from insitu.protocols.envelope import Envelope, Expect
from insitu.run.validation import magnitude_bound, numeric_metrics, usable_fit_result
from insitu.strategies.strategy import Aggregate

FIT: Literal["fit"] = "fit"
EVALUATE: Literal["evaluate"] = "evaluate"
def task_envelope(kind: TaskKind, parameters: Parameters, model_version: int, config: Config) -> Envelope:
    """A fit or evaluate task: the global parameters, scalar config, and array-valued config by name."""
    scalars = {k: v for k, v in config.items() if not isinstance(v, Parameters)}
    arrays = {k: v for k, v in config.items() if isinstance(v, Parameters)}
    return Envelope(kind, round=int(config.get("round", 0)), model_version=model_version,  # type: ignore[arg-type]
                    config=scalars, parameters=parameters, arrays=arrays)


def expect(kind: TaskKind, configs: Iterable[Config] | None = None) -> Expect:
    """What a reply to a fit or evaluate task may carry: a fit result's parameters and its algorithm's
    extras (its example count a training count); an evaluation's counts and metrics only.

    Given the tasks' ``configs``, a fit reply may carry only the extras of the algorithms they name
    (``config["algorithm"]``, as the strategy set it; plain local SGD when none); without them, the
    extras any registered client algorithm returns. Each is at most the model's size and shaped like
    it; others are refused from the header. The strategy's algorithm then refuses extras that are
    not its own."""
    if kind == FIT:
        if configs is None:
            return Expect(parameters=True, arrays=result_extras(), training=True)
        extras: set[str] = set()
        for config in configs:
            name = config.get(ALGORITHM, LocalSGD.name)
            algorithm = ALGORITHMS.get(name) if isinstance(name, str) else None
            extras.update(result_extras() if algorithm is None else algorithm.result_extras)
        return Expect(parameters=True, arrays=frozenset(extras), training=True)
    if kind == EVALUATE:
        return Expect()
    raise ValueError(f"the plain exchange sends fit and evaluate tasks, not {kind!r}")


def read_reply(kind: TaskKind, reply: Envelope) -> FitResult | EvalResult:
    """The result a reply envelope stands for (the transport checked it against :func:`expect`)."""
    if kind == FIT:
        if reply.parameters is None:
            raise ValueError("a fit reply without parameters")
        return FitResult(reply.parameters, reply.num_examples, reply.metrics, reply.arrays)
    return EvalResult(reply.loss, reply.num_examples, reply.metrics)


def task_config(task: Envelope) -> Config:
    """The config a ``Client`` receives: the scalar entries and the named arrays."""
    return {**task.config, **task.arrays}


def _refuse_under_noise_floor(policy: ClientPolicy, task: Envelope) -> None:
    if policy.min_noise_multiplier is not None:
        raise ValueError(f"this client takes part only in distributed-DP secure rounds, but the server sent a "
                         f"plain {task.protocol} task: its result would leave this client un-noised")


class _PlainHandler:
    """What both plain handlers share: the user's client, the client's policy, and the task's checks."""

    honours_noise_floor: ClassVar[bool] = True  # it refuses every task under a noise floor

    def __init__(self, client: Client, policy: ClientPolicy) -> None:
        self.client, self.policy = client, policy

    def _global_parameters(self, task: Envelope) -> Parameters:
        _refuse_under_noise_floor(self.policy, task)
        if task.parameters is None:
            raise ValueError(f"the server sent a {task.protocol} task without parameters")
        return task.parameters


class FitHandler(_PlainHandler):
    """Client half of a fit task: ``client.fit`` on the global parameters."""

    def handle(self, task: Envelope) -> Envelope:
        result = self.client.fit(self._global_parameters(task), task_config(task))
        return Envelope(FIT, round=task.round, model_version=task.model_version, parameters=result.parameters,
                        arrays=dict(result.extras), num_examples=int(result.num_examples),
                        metrics=dict(result.metrics))


class EvaluateHandler(_PlainHandler):
    """Client half of an evaluate task: ``client.evaluate`` on the global parameters."""

    def handle(self, task: Envelope) -> Envelope:
        result = self.client.evaluate(self._global_parameters(task), task_config(task))
        return Envelope(EVALUATE, round=task.round, model_version=task.model_version,
                        num_examples=int(result.num_examples), loss=float(result.loss), metrics=dict(result.metrics))


def accepted_fits(results: Iterable[tuple[str, Outcome]],
                  round_: FitRound) -> Generator[tuple[str, FitResult], None, None]:
    """Validated fit results, streamed to the aggregator as they arrive; rejections are recorded.

    A result is refused when it failed, does not match the model, holds non-finite or absurd values
    (:func:`~insitu.run.validation.check_fit_result`), or lacks what the client algorithm needs."""
    expected, bound = round_.parameters.specs, magnitude_bound(round_.parameters)
    for client_id, result in results:
        reason = usable_fit_result(round_.strategy, result, expected, bound)
        if reason is not None or not isinstance(result, FitResult):
            round_.reject(client_id, "fit", reason or "not a fit result", result)
            continue
        # the client's own metrics first: what the server counted is recorded as counted
        round_.record.clients[client_id] = {**numeric_metrics(result.metrics), "num_examples": result.num_examples}
        yield client_id, result
        del result  # let the update go before the next one is fetched (server memory O(model))


class PlainExchange:
    """Fit tasks to every selected client, their validated results streamed into ``strategy.aggregate_fit``."""

    name: str = FIT

    def fit(self, engine: Engine, round_: FitRound) -> Aggregate:
        parameters = round_.parameters
        results = run_tasks(engine, FIT, parameters, round_.server_round - 1, round_.tasks)
        accepted = accepted_fits(results, round_)
        try:
            return round_.strategy.aggregate_fit(parameters, round_.server_state, accepted,
                                                 num_clients=round_.num_clients)
        finally:
            accepted.close()
