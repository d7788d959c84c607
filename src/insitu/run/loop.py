"""The round loop: one transport-agnostic coordinator for every engine.

Each round: wait for enough clients, let the strategy pick some and their config, stream their
results through validation into the strategy's aggregation, evaluate, record. Bad results are
rejected and logged by client; a round with too few usable results fails on its own (recorded,
global model unchanged) without stopping the run.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from insitu.aggregation.base import AggregationAssumptionError, EmptyAggregationError
from insitu.client.api import EvalResult
from insitu.engines.base import Engine, Task, run_tasks
from insitu.engines.systems import ClientDroppedOut, StragglerDropped
from insitu.errors import RoundAborted
from insitu.params import Parameters
from insitu.privacy.distributed import DistributedDP
from insitu.privacy.randomness import RandomnessSource, SimulationSeed
from insitu.protocols.base import FitRound, RoundProtocol
from insitu.protocols.registry import fit_protocol
from insitu.run.history import Evaluation, History, RoundRecord
from insitu.run.validation import check_aggregate, check_eval_result, magnitude_bound, numeric_metrics
from insitu.strategies.strategy import ServerState, Strategy

log = logging.getLogger("insitu")

RoundCallback = Callable[[RoundRecord, Parameters, ServerState], None]


@dataclass
class RunResult:
    """Final global parameters, the per-round history and the server state (optimizer, algorithm)."""

    parameters: Parameters
    history: History
    server_state: ServerState | None = None


def client_seed(seed: int, server_round: int, client_id: str) -> int:
    """A 31-bit seed for one client in one round, stable across engines and processes."""
    entropy = [seed, server_round, zlib.crc32(client_id.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


class Coordinator:
    """Drives ``num_rounds`` rounds of ``strategy`` over ``pool``.

    ``start_round``/``history``/``server_state`` let a restarted server continue a run;
    ``on_round`` is called after every round (persistence, progress output); ``stop_when(record)``
    returning True ends the run after that round (e.g. a target accuracy was reached).

    ``sampling`` draws who trains each round. By default: under central DP the privacy settings'
    own randomness (OS entropy unless a simulation seeded it), otherwise ``SimulationSeed(seed)``
    so runs without DP are reproducible. A DP deployment passes ``OSEntropy()``: anyone who can
    recompute the sample learns who took part, which epsilon does not cover.

    ``protocol`` is the round protocol's server half; by default ``fit_protocol`` picks the plain
    exchange, or secure aggregation message by message on an engine that carries envelopes.
    """

    def __init__(
        self,
        strategy: Strategy,
        pool: Engine,
        *,
        num_rounds: int,
        seed: int = 0,
        wait_timeout: float | None = None,
        on_round: RoundCallback | None = None,
        evaluate_initial: bool = True,
        stop_when: Callable[[RoundRecord], bool] | None = None,
        sampling: RandomnessSource | None = None,
        protocol: RoundProtocol | None = None,
    ) -> None:
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        self.strategy = strategy
        self.pool = pool
        self.num_rounds = num_rounds
        self.seed = seed
        self.wait_timeout = wait_timeout
        self.on_round = on_round
        self.evaluate_initial = evaluate_initial
        self.stop_when = stop_when
        if sampling is None:
            sampling = strategy.privacy.randomness if strategy.privacy is not None else SimulationSeed(seed)
        self.sampling = sampling
        self.protocol = protocol  # None: fit_protocol chooses (plain exchange, or secure aggregation over gRPC)

    def run(
        self,
        parameters: Parameters,
        *,
        start_round: int = 1,
        history: History | None = None,
        server_state: ServerState | None = None,
    ) -> RunResult:
        history = history if history is not None else History()
        privacy = self.strategy.privacy
        if privacy is not None:
            level = logging.WARNING if privacy.randomness.reproducible or self.sampling.reproducible else logging.INFO
            if isinstance(privacy, DistributedDP):  # the clients add the noise
                noise = (f"simulated clients' noise from {privacy.randomness.describe()}" if privacy.randomness.reproducible
                         else "each client draws its noise share from its own OS entropy")
                log.log(level, "distributed DP: %s; client sampling from %s", noise, self.sampling.describe())
            else:
                log.log(level, "central DP: noise from %s; client sampling from %s", privacy.randomness.describe(),
                        self.sampling.describe())
        if server_state is None:
            server_state = self.strategy.init_state(parameters)
        if start_round == 1 and self.evaluate_initial and history.initial is None:
            history.initial = evaluate_central(self.strategy, 0, parameters)
        for server_round in range(start_round, self.num_rounds + 1):
            reason = self.strategy.stop_reason(server_state)
            if reason is not None:
                log.warning("stopping before round %d: %s", server_round, reason)
                history.stopped = reason
                break
            record, parameters, server_state = self.run_round(server_round, parameters, server_state)
            history.rounds.append(record)
            if self.on_round is not None:
                self.on_round(record, parameters, server_state)
            if self.stop_when is not None and self.stop_when(record):
                log.info("round %d: stopping early (stop condition met)", server_round)
                break
        return RunResult(parameters, history, server_state)

    # -- one round ---------------------------------------------------------------------------
    def run_round(self, server_round: int, parameters: Parameters,
                  server_state: ServerState) -> tuple[RoundRecord, Parameters, ServerState]:
        strategy = self.strategy
        record = RoundRecord(round=server_round)
        waiting = time.perf_counter()
        available = self.pool.wait_for(strategy.min_available_clients, self.wait_timeout)
        started = time.perf_counter()
        record.timings["wait_s"] = started - waiting  # not part of the round's own time
        rng = self.sampling.generator(server_round, "sampling")
        record.selected = strategy.sample_fit(available, rng)
        base_config = strategy.fit_config_for(server_round)
        base_config.update(strategy.algorithm_config(server_state, parameters.specs))
        tasks = [self._task(cid, server_round, base_config) for cid in record.selected]

        try:
            protocol = self.protocol or fit_protocol(strategy, self.pool)
            outcome = protocol.fit(self.pool, FitRound(
                strategy, server_round, parameters, server_state, tasks, record, num_clients=len(available),
                reject=lambda cid, stage, reason, result: reject(server_round, cid, stage, reason, record, result)))
        except (AggregationAssumptionError, EmptyAggregationError, RoundAborted) as error:
            outcome = None
            problem = f"aggregation refused: {error}"
        computed_privacy = None  # the privacy accounting of an aggregate computed, then refused
        if outcome is not None and outcome.parameters is not None:  # never commit a non-finite or absurd model
            absurd = check_aggregate(outcome.parameters, magnitude_bound(parameters))
            if absurd is not None:
                computed_privacy = outcome.server_state.privacy
                outcome, problem = None, f"aggregation refused: {absurd}"
        record.timings["fit_s"] = time.perf_counter() - started
        if outcome is not None:
            record.num_results = outcome.num_results
            problem = (f"only {outcome.num_results} usable results of {len(tasks)} "
                       f"(min_fit_clients={strategy.min_fit_clients})")
        # Under central DP every round is released whatever the number of results (refusing a round
        # for too few would make the release depend on who was sampled).
        too_few = outcome is not None and strategy.privacy is None and outcome.num_results < strategy.min_fit_clients
        if outcome is None or too_few or outcome.parameters is None:
            record.status = "failed"
            record.error = f"round {server_round}: {problem}; global model left unchanged" + _failure_summary(record)
            log.error(record.error)
            if computed_privacy is not None:  # the (noised) sum was computed: charged as it was, not as planned
                server_state = ServerState(server_state.optimizer, server_state.algorithm, computed_privacy)
            else:
                server_state = strategy.account_failed_round(server_state, len(available),  # DP: counted all the same
                                                             parameters.num_values)
            if strategy.privacy is not None:
                record.fit_metrics = {"epsilon": strategy.privacy.epsilon(server_state.privacy),
                                      "clip_norm": float(server_state.privacy["clip_norm"][0])}
        else:
            parameters, server_state = outcome.parameters, outcome.server_state
            record.fit_metrics = outcome.metrics

        eval_started = time.perf_counter()
        self._evaluate(server_round, parameters, available, record)
        record.timings["evaluate_s"] = time.perf_counter() - eval_started
        record.timings["total_s"] = time.perf_counter() - started
        record.timings["clock_s"] = self.pool.clock()
        if strategy.withholds_client_facts:
            _withhold_client_facts(record)
        return record, parameters, server_state

    def _task(self, client_id: str, server_round: int, base_config: dict[str, Any]) -> Task:
        config = dict(base_config)
        config.setdefault("round", server_round)
        config.setdefault("seed", client_seed(self.seed, server_round, client_id))
        return Task(client_id, config)

    def _evaluate(self, server_round: int, parameters: Parameters, available: Sequence[str], record: RoundRecord) -> None:
        strategy = self.strategy
        rng = np.random.default_rng([self.seed, server_round, 1])
        # Under central DP federated evaluation stays on the clients (epsilon does not cover it).
        chosen = [] if strategy.withholds_client_facts else strategy.sample_evaluate(available, rng)
        if chosen:
            base_config = strategy.evaluate_config_for(server_round)
            tasks = [self._task(cid, server_round, base_config) for cid in chosen]
            results: list[tuple[str, EvalResult]] = []
            for client_id, result in run_tasks(self.pool, "evaluate", parameters, server_round, tasks):
                reason: str | None
                if isinstance(result, BaseException):
                    reason = f"evaluate failed: {type(result).__name__}: {result}"
                elif not isinstance(result, EvalResult):
                    reason = f"evaluate returned a {type(result).__name__}, expected an EvalResult"
                else:
                    reason = check_eval_result(result)
                if reason is not None:
                    reject(server_round, client_id, "evaluate", reason, record, result)
                    continue
                assert isinstance(result, EvalResult)
                results.append((client_id, result))
                if result.num_examples > 0:
                    entry = record.clients.setdefault(client_id, {})
                    entry["eval_loss"] = float(result.loss)
                    entry["eval_examples"] = result.num_examples
                    entry.update({f"eval_{k}": v for k, v in numeric_metrics(result.metrics).items()})
            loss, metrics = strategy.aggregate_evaluate(results)
            if loss is not None:
                examples = sum(r.num_examples for _, r in results)
                record.federated = Evaluation(loss, metrics, examples)
        central = evaluate_central(strategy, server_round, parameters)
        if central is not None:
            record.centralized = central


def reject(server_round: int, client_id: str, stage: str, reason: str, record: RoundRecord,
           outcome: object = None) -> None:
    """Record (and log) a client result that was not used. A simulated dropout or straggler is the systems
    model at work, logged at INFO; anything else is a warning."""
    level = logging.INFO if isinstance(outcome, (ClientDroppedOut, StragglerDropped)) else logging.WARNING
    log.log(level, "round %d: rejected %s result from client %s: %s", server_round, stage, client_id, reason)
    record.failures.append({"client": client_id, "stage": stage, "reason": reason})


def evaluate_central(strategy: Strategy, server_round: int, parameters: Parameters) -> Evaluation | None:
    """The strategy's centralized evaluation of ``parameters`` (None when it has none, or skips this round)."""
    central = strategy.evaluate(server_round, parameters)
    return None if central is None else Evaluation(float(central[0]), dict(central[1]))


def _withhold_client_facts(record: RoundRecord) -> None:
    """Keep only what central DP's epsilon covers: the released model's post-processing (centralized
    evaluation), epsilon and clip norm. Who was sampled, how many results came, per-client metrics,
    rejections and timings stay out of the history (the server log keeps the operational details)."""
    record.selected, record.clients, record.failures, record.timings = [], {}, [], {}
    record.num_results = 0
    record.federated = None
    record.fit_metrics = {k: v for k, v in record.fit_metrics.items() if k in ("epsilon", "clip_norm")}
    if record.error is not None:
        record.error = (f"round {record.round}: aggregation failed; global model left unchanged (details in the "
                        "server log; per-client facts are not recorded under DP)")
    record.withheld = True


def _failure_summary(record: RoundRecord) -> str:
    if not record.failures:
        return ""
    shown = "; ".join(f"client {f['client']}: {f['reason']}" for f in record.failures[:3])
    more = f" (+{len(record.failures) - 3} more)" if len(record.failures) > 3 else ""
    return f". Rejected: {shown}{more}"
