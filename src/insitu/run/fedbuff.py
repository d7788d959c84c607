"""FedBuff: buffered asynchronous aggregation (Nguyen et al. 2022), as a policy over an engine's task stream.

No round waits for its slowest client. ``concurrency`` clients train at once; whenever one finishes,
its update goes into a buffer and a new client starts on the current model. Once ``buffer_size``
(K) updates are buffered, the server takes a step, and the model version goes up by one. An update
trained from version v and arriving at version t is ``t - v`` versions stale; it is scaled by
``(1 + staleness) ** -staleness_exponent`` (the paper's 1/sqrt(1 + s) by default) so that old
updates pull less. The buffer is folded by the strategy's own aggregation (reducer and server
optimizer), so robust rules and FedOpt work unchanged on staleness-scaled updates.

A server step is recorded like a synchronous round (``RoundRecord``), with the engine's clock
(simulated seconds under a systems model) in ``timings["clock_s"]`` and the buffer's staleness in
``fit_metrics``. The same policy drives the in-process engine and the gRPC engine.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from insitu.aggregation.base import AggregationAssumptionError
from insitu.client.api import FitResult
from insitu.engines.base import Engine, Task
from insitu.params import Parameters
from insitu.privacy.randomness import RandomnessSource, SimulationSeed
from insitu.run.history import History, RoundRecord
from insitu.run.loop import RoundCallback, RunResult, client_seed, evaluate_central, reject
from insitu.run.validation import check_aggregate, magnitude_bound, numeric_metrics, usable_fit_result
from insitu.strategies.strategy import Aggregate, ServerState, Strategy

log = logging.getLogger("insitu")

MAX_RETRIES = 3
"""When every client that could fill the buffer has failed its last task, how many times they all get
another chance (with no usable result in between) before the run stops."""


@dataclass(frozen=True)
class FedBuff:
    """FedBuff's settings: K updates per server step, how many clients train at once, staleness weighting."""

    buffer_size: int = 10
    concurrency: int = 0  # 0: twice the buffer (at most the clients there are)
    staleness_exponent: float = 0.5
    max_staleness: int = 0  # 0: keep every update however stale

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ValueError(f"buffer_size (K) must be >= 1, got {self.buffer_size}")
        if self.concurrency < 0:
            raise ValueError(f"concurrency must be >= 0 (0 = 2 x buffer_size), got {self.concurrency}")
        if not (math.isfinite(self.staleness_exponent) and self.staleness_exponent >= 0):
            raise ValueError(f"staleness_exponent must be a finite number >= 0, got {self.staleness_exponent}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 (0 = no limit), got {self.max_staleness}")

    def clients_at_once(self, num_clients: int) -> int:
        """How many clients train at once: ``concurrency``, or by default twice the buffer, at most the
        ``num_clients`` there are."""
        return self.concurrency or min(2 * self.buffer_size, num_clients)

    def staleness_weight(self, staleness: int) -> float:
        """(1 + s)^-a: 1 for a fresh update, 1/sqrt(2) one version late with the default a = 1/2."""
        return float((1.0 + staleness) ** -self.staleness_exponent)


def check_async_strategy(strategy: Strategy, parameters: Parameters) -> None:
    """Refuse strategies whose guarantees or state assume synchronous rounds, naming why."""
    if strategy.privacy is not None:
        raise ValueError("FedBuff with DP is not supported: the privacy accountant assumes synchronous, Poisson-"
                         "sampled rounds. Use mode 'sync' with DP")
    if strategy.secure_aggregation is not None:
        raise ValueError("FedBuff with secure aggregation is not supported: the masks are agreed per synchronous "
                         "round. Use mode 'sync' with secure aggregation")
    if strategy.algorithm.init_state(parameters):
        raise ValueError(f"FedBuff with {type(strategy.algorithm).__name__} is not supported: its server state "
                         "(e.g. SCAFFOLD's control variate) assumes synchronous rounds. Use fedavg or fedprox")


class AsyncCoordinator:
    """Drives ``num_rounds`` FedBuff server steps of ``strategy`` over ``engine``.

    ``on_round`` is called after every server step, ``stop_when(record)`` may end the run early,
    ``sampling`` draws which idle client starts next (seeded in simulation: reproducible).
    """

    def __init__(self, strategy: Strategy, engine: Engine, fedbuff: FedBuff, *, num_rounds: int, seed: int = 0,
                 wait_timeout: float | None = None, on_round: RoundCallback | None = None,
                 evaluate_initial: bool = True, stop_when: Callable[[RoundRecord], bool] | None = None,
                 sampling: RandomnessSource | None = None) -> None:
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        self.strategy, self.engine, self.fedbuff = strategy, engine, fedbuff
        self.num_rounds, self.seed, self.wait_timeout = num_rounds, seed, wait_timeout
        self.on_round, self.evaluate_initial, self.stop_when = on_round, evaluate_initial, stop_when
        self.sampling = sampling if sampling is not None else SimulationSeed(seed)

    def run(self, parameters: Parameters, *, start_round: int = 1, history: History | None = None,
            server_state: ServerState | None = None) -> RunResult:
        strategy, engine, fedbuff = self.strategy, self.engine, self.fedbuff
        check_async_strategy(strategy, parameters)
        history = history if history is not None else History()
        state = server_state if server_state is not None else strategy.init_state(parameters)
        if start_round == 1 and self.evaluate_initial and history.initial is None:
            history.initial = evaluate_central(strategy, 0, parameters)
        available = engine.wait_for(strategy.min_available_clients, self.wait_timeout)
        rng = self.sampling.generator(start_round, "sampling")  # one stream for the whole run
        version = start_round - 1
        models: dict[int, Parameters] = {version: parameters}  # the models clients are training from
        training: dict[str, int] = {}  # client id -> the version it trains from
        # Who may not get a task until the next server step: a client whose update is in the buffer (a
        # buffer holds one update per client, so one fast client cannot fill it), and one whose last task
        # failed (so a failing or vanished client is not handed task after task).
        in_buffer: set[str] = set()
        benched: set[str] = set()
        retries = 0  # times every idle client was benched and all were given another chance, since a usable result
        expected, bound = parameters.specs, magnitude_bound(parameters)

        def start() -> None:
            idle = [cid for cid in available if cid not in training and cid not in in_buffer and cid not in benched]
            count = min(fedbuff.clients_at_once(len(available)) - len(training), len(idle))
            if count <= 0:
                return
            picks = rng.permutation(len(idle))[:count] if isinstance(rng, np.random.Generator) \
                else np.argsort(rng.random(len(idle)))[:count]
            config = strategy.fit_config_for(version + 1)
            config.update(strategy.algorithm_config(state, parameters.specs))
            tasks = []
            for i in sorted(int(p) for p in picks):
                cid = idle[i]
                task_config = dict(config)
                task_config.setdefault("round", version + 1)
                # a client gets at most one task per model version, so (version, client) names it, also across a resume
                task_config.setdefault("seed", client_seed(self.seed, version + 1, cid))
                training[cid] = version
                tasks.append(Task(cid, task_config))
            engine.submit("fit", parameters, version, tasks)

        record = RoundRecord(round=version + 1)
        buffer: list[tuple[str, FitResult]] = []
        staleness: list[int] = []
        step_started = time.perf_counter()
        start()
        for result in engine.results():
            training.pop(result.client_id, None)
            stale = version - result.model_version
            outcome = result.outcome
            reason = usable_fit_result(strategy, outcome, expected, bound)
            if reason is None and fedbuff.max_staleness and stale > fedbuff.max_staleness:
                reason = f"update is {stale} versions stale (max_staleness={fedbuff.max_staleness})"
            if reason is not None or not isinstance(outcome, FitResult):
                reject(version + 1, result.client_id, "fit", reason or "no result", record, outcome)
                benched.add(result.client_id)
            else:
                retries = 0
                base = models[result.model_version].flat()
                scaled = outcome.parameters.flat() - base  # a new array: the result may view shared memory
                scaled *= np.float32(fedbuff.staleness_weight(stale))
                scaled += parameters.flat()
                buffer.append((result.client_id, FitResult(Parameters.from_flat(scaled, expected, copy=False),
                                                           outcome.num_examples, dict(outcome.metrics))))
                staleness.append(stale)
                in_buffer.add(result.client_id)
                record.selected.append(result.client_id)
                # the client's own metrics first: what the server measured is recorded as measured
                record.clients[result.client_id] = {**numeric_metrics(outcome.metrics),
                                                    "num_examples": outcome.num_examples, "staleness": stale}
            del result, outcome
            if len(buffer) >= fedbuff.buffer_size:
                parameters, state = self._step(version + 1, parameters, state, buffer, staleness, record,
                                               len(available), step_started)
                version += 1
                models[version] = parameters
                history.rounds.append(record)
                if self.on_round is not None:
                    self.on_round(record, parameters, state)
                if version >= self.num_rounds or (self.stop_when is not None and self.stop_when(record)):
                    break
                buffer, staleness, record = [], [], RoundRecord(round=version + 1)
                in_buffer.clear()
                benched.clear()
                step_started = time.perf_counter()
                # clients may have left or joined (the run goes on with whoever is there: a step never waits
                # for a particular client); the next update is bounded by the new model
                available = engine.wait_for(1, self.wait_timeout)
                bound = magnitude_bound(parameters)
            for old in [v for v in models if v != version and v not in training.values()]:
                del models[old]  # no client trains from it any more
            start()
            if not training and benched and retries < MAX_RETRIES:
                # Nobody left to dispatch: every other client failed its last task. Failures can be passing (a
                # dropout, a network blip): give them all another chance, a bounded number of times.
                retries += 1
                benched.clear()
                available = engine.wait_for(1, self.wait_timeout)
                start()
            if not training:
                raise RuntimeError(
                    f"server step {version + 1} cannot fill its buffer ({len(buffer)} of {fedbuff.buffer_size} "
                    f"updates): every other available client failed its task {MAX_RETRIES + 1} times in a row (see "
                    "the rejections logged above); fix those clients, or lower buffer_size")
        else:
            if version < self.num_rounds:
                raise RuntimeError(f"the engine ran out of tasks after {version} of {self.num_rounds} server steps: "
                                   "every client failed or none was available")
        # Tasks still running are abandoned: the in-process engine drops them when closed, and a remote
        # client's late result is discarded by the engine.
        return RunResult(parameters, history, state)

    def _step(self, server_round: int, parameters: Parameters, state: ServerState,
              buffer: list[tuple[str, FitResult]], staleness: list[int], record: RoundRecord, num_clients: int,
              started: float) -> tuple[Parameters, ServerState]:
        """Fold the buffer into a server step; a refused aggregate leaves the model unchanged (the step still
        counts: the version goes up, so updates in flight are one version staler, as after any step)."""
        problem: str | None = None
        try:
            outcome: Aggregate | None = self.strategy.aggregate_fit(parameters, state, buffer,
                                                                    num_clients=num_clients)
        except AggregationAssumptionError as error:  # e.g. Krum with too few updates for its f
            outcome, problem = None, str(error)
        if outcome is not None:
            record.num_results = outcome.num_results
            problem = None if outcome.parameters is None else check_aggregate(outcome.parameters,
                                                                              magnitude_bound(parameters))
        if outcome is None or outcome.parameters is None or problem is not None:
            record.status = "failed"
            record.error = f"server step {server_round}: aggregation refused: {problem}; global model left unchanged"
            log.error(record.error)
        else:
            parameters, state = outcome.parameters, outcome.server_state
            record.fit_metrics = dict(outcome.metrics)
        record.fit_metrics["staleness_mean"] = float(np.mean(staleness))
        record.fit_metrics["staleness_max"] = float(max(staleness))
        record.timings["fit_s"] = time.perf_counter() - started
        record.timings["clock_s"] = self.engine.clock()
        eval_started = time.perf_counter()
        central = evaluate_central(self.strategy, server_round, parameters)
        if central is not None:
            record.centralized = central
        record.timings["evaluate_s"] = time.perf_counter() - eval_started
        record.timings["total_s"] = time.perf_counter() - started
        return parameters, state
