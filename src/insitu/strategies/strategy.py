"""Strategy: the server side of a federated algorithm, built by composition.

A strategy picks clients, says what config they get, and folds their results into new global
parameters through a reducer and a server optimizer. It does no I/O and owns no loop, so the same
strategy runs in simulation and in deployment. Variants are factory functions (``fedavg``,
``fedsgd``), not subclasses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from insitu.aggregation import (
    Pipeline,
    Properties,
    Reducer,
    Report,
    WeightedMean,
    clip,
    pipeline,
    total,
    weighted_average_metrics,
    weighted_mean,
)
from insitu.aggregation.noise import scale
from insitu.client.api import Config, EvalResult, FitResult, Metrics
from insitu.params import Parameters, ParamSpec
from insitu.privacy.central import CentralDP
from insitu.privacy.distributed import DistributedDP, RoundPlan
from insitu.privacy.randomness import Generator
from insitu.privacy.secure import SecureAggregation, SecureSum
from insitu.strategies.algorithms import AlgorithmState, ClientAlgorithm, FedProx, Scaffold, local_sgd
from insitu.strategies.server_optimizers import ServerOptimizer, sgd

ConfigSource = Config | Callable[[int], Config]
CentralEvaluator = Callable[[int, Parameters], tuple[float, Metrics] | None]
"""(round, global parameters) -> (loss, metrics), or None to skip evaluating that round."""


@dataclass
class ServerState:
    """What the server carries from round to round besides the model: a plain value, checkpointed
    as named arrays. ``optimizer`` is the server optimizer's state (a dict of arrays, or None);
    ``algorithm`` the client algorithm's (e.g. SCAFFOLD's control variate ``c``)."""

    optimizer: Any = None
    algorithm: AlgorithmState = field(default_factory=dict)
    privacy: AlgorithmState = field(default_factory=dict)  # central DP: accountant history, clip norm

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat name -> array form for storage ("optimizer/m", "algorithm/c", "privacy/history", ...)."""
        arrays: dict[str, np.ndarray] = {}
        if isinstance(self.optimizer, dict):
            arrays.update({f"optimizer/{k}": np.asarray(v) for k, v in self.optimizer.items()})
        elif self.optimizer is not None:
            raise TypeError(f"server optimizer state must be a dict of arrays or None, got {type(self.optimizer).__name__}")
        arrays.update({f"algorithm/{k}": np.asarray(v) for k, v in self.algorithm.items()})
        arrays.update({f"privacy/{k}": np.asarray(v) for k, v in self.privacy.items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ServerState:
        parts: dict[str, dict[str, np.ndarray]] = {"optimizer": {}, "algorithm": {}, "privacy": {}}
        for key, value in arrays.items():
            kind, _, name = key.partition("/")
            if kind not in parts or not name:
                raise ValueError(f"unknown server state entry {key!r}")
            parts[kind][name] = value
        return cls(parts["optimizer"] or None, parts["algorithm"], parts["privacy"])


@dataclass
class Aggregate:
    """The outcome of folding one round's results: new parameters (None if none arrived), and the
    aggregation pipeline's report (its declared metrics: e.g. Krum's ``selected``, ``rejected``)."""

    parameters: Parameters | None
    server_state: ServerState
    metrics: Metrics
    num_results: int
    report: Report = field(default_factory=dict)


@dataclass
class Strategy:
    """Client sampling + reducer + server optimizer + per-round configs (see ``fedavg``).

    Each round's aggregation is one pipeline (:mod:`insitu.aggregation.pipeline`): ``reducer`` alone,
    or, under ``privacy`` and/or ``secure_aggregation``, clip -> (secure) sum -> noise -> 1 / (q N) in
    place of the mean. A combination that cannot be honoured is refused here, when it is built.
    """

    name: str = "fedavg"
    fraction_fit: float = 1.0
    min_fit_clients: int = 2
    min_available_clients: int = 2
    fraction_evaluate: float = 1.0
    min_evaluate_clients: int = 1
    reducer: Reducer = field(default_factory=weighted_mean)
    server_optimizer: ServerOptimizer = field(default_factory=sgd)
    algorithm: ClientAlgorithm = field(default_factory=local_sgd)
    privacy: CentralDP | DistributedDP | None = None  # DP-FedAvg: Poisson sampling, clipped noisy mean, accountant
    secure_aggregation: SecureAggregation | None = None  # the sum through the SecAgg protocol (simulation)
    fit_config: ConfigSource = field(default_factory=dict)
    evaluate_config: ConfigSource = field(default_factory=dict)
    evaluate_fn: CentralEvaluator | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction_fit <= 1.0:
            raise ValueError(f"fraction_fit must be in (0, 1], got {self.fraction_fit}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ValueError(f"fraction_evaluate must be in [0, 1], got {self.fraction_evaluate}")
        if self.min_fit_clients < 1 or self.min_evaluate_clients < 0:
            raise ValueError("min_fit_clients must be >= 1 and min_evaluate_clients >= 0")
        if self.min_available_clients < self.min_fit_clients:
            raise ValueError(
                f"min_available_clients ({self.min_available_clients}) must be >= min_fit_clients "
                f"({self.min_fit_clients}): a round can never start otherwise"
            )
        self._check_reducer()
        if self.secure_aggregation is not None and not self.algorithm.secure_compatible:
            raise ValueError(f"{type(self.algorithm).__name__} sends extra per-client arrays that secure aggregation "
                             "cannot hide: use it without secure aggregation, or choose fedavg/fedprox/fedsgd")
        if self.privacy is not None:
            self._check_privacy()
        if isinstance(self.privacy, DistributedDP) and self.secure_aggregation is None:
            raise ValueError("distributed DP adds each client's noise share before secure aggregation: it needs "
                             "secure_aggregation (without it the server would see every noised update)")

    def _check_reducer(self) -> None:
        """Refuse a reducer that DP or secure aggregation cannot stand in for, from its declared properties."""
        reducer = self.reducer
        props = getattr(reducer, "properties", None)  # a clear error for a reducer written before properties
        if not isinstance(props, Properties):
            raise TypeError(f"reducer {reducer!r} declares no properties: give it `properties = Properties(...)` "
                            "(insitu.aggregation.Properties) and return (vector, report) from finish")
        if self.secure_aggregation is not None and props.needs_individual:
            raise ValueError(f"secure aggregation reveals only the sum: {reducer!r} needs individual updates (robust "
                             "rules and screening do); use aggregator 'mean' (for bounded updates, use dp_clip)")
        if self.privacy is not None and not props.linear:
            kind = "distributed DP" if isinstance(self.privacy, DistributedDP) else "central DP"
            raise ValueError(f"{kind} clips and noises the mean itself, its noise calibrated to the clipped sum's "
                             f"sensitivity C / (q N): it cannot follow {reducer!r}, which is not a weighted sum of the "
                             "updates; use aggregator 'mean' without clip_norm or screen")
        if self.secure_aggregation is not None and not props.linear:
            raise ValueError(f"secure aggregation reveals only the sum: {reducer!r} is not a weighted sum of the "
                             "updates; use aggregator 'mean' without clip_norm (for bounded updates, use dp_clip)")
        if (self.privacy is not None or self.secure_aggregation is not None) and not isinstance(reducer, WeightedMean):
            what = "DP" if self.privacy is not None else "secure aggregation"
            raise ValueError(f"{what} computes the round's (clipped, noised) mean with its own stages and would not "
                             f"run {reducer!r}: leave the reducer at the default weighted mean (aggregator 'mean')")

    def _check_privacy(self) -> None:
        """Refuse settings under which whether (or what) a round releases depends on who was sampled,
        or under which something leaves the server that epsilon does not cover."""
        kind = "distributed DP" if isinstance(self.privacy, DistributedDP) else "central DP"
        if not self.algorithm.secure_compatible:
            raise ValueError(f"{type(self.algorithm).__name__} aggregates extra per-client arrays (e.g. control "
                             f"variates) that {kind} neither clips nor noises, so epsilon would not cover them: "
                             f"use fedavg, fedprox or fedsgd with {kind}")
        if self.min_fit_clients > 1:
            raise ValueError(f"{kind} releases every round, whoever was sampled (the accountant counts every "
                             f"round); min_fit_clients={self.min_fit_clients} would release a round only when enough "
                             f"clients were sampled, so the release would depend on the sample: use min_fit_clients=1")

    # -- selection and configs --------------------------------------------------------------
    def num_fit_clients(self, num_available: int) -> int:
        """max(fraction_fit x available, min_fit_clients), capped at what is available."""
        wanted = max(math.ceil(self.fraction_fit * num_available - 1e-9), self.min_fit_clients)
        return min(wanted, num_available)

    def num_evaluate_clients(self, num_available: int) -> int:
        if self.fraction_evaluate == 0.0:
            return 0
        wanted = max(math.ceil(self.fraction_evaluate * num_available - 1e-9), self.min_evaluate_clients)
        return min(wanted, num_available)

    def sample_fit(self, available: Sequence[str], rng: Generator) -> list[str]:
        """The clients to train this round. Under central DP a Poisson sample (each client with
        probability q), which must stay secret: draw it from OS entropy in a deployment."""
        if self.privacy is not None:  # the accountant's analysis assumes Poisson sampling
            # one uniform per client (the draw must not depend on who is picked), but only the picked
            # ids are looked up: ``available`` may be a lazy sequence of a million ids
            keep = np.flatnonzero(np.asarray(rng.random(len(available))) < self.privacy.sample_rate)
            return [available[int(i)] for i in keep]
        return _sample(available, self.num_fit_clients(len(available)), rng)

    def sample_evaluate(self, available: Sequence[str], rng: Generator) -> list[str]:
        return _sample(available, self.num_evaluate_clients(len(available)), rng)

    def fit_config_for(self, server_round: int) -> Config:
        return _resolve(self.fit_config, server_round)

    def evaluate_config_for(self, server_round: int) -> Config:
        return _resolve(self.evaluate_config, server_round)

    def algorithm_config(self, state: ServerState, specs: tuple[ParamSpec, ...]) -> Config:
        """What the client algorithm adds to every fit task (e.g. FedProx's mu, SCAFFOLD's c)."""
        return self.algorithm.fit_config(state.algorithm, specs)

    def check_fit_result(self, result: FitResult, specs: tuple[ParamSpec, ...]) -> str | None:
        """Why the client algorithm cannot use ``result`` (e.g. SCAFFOLD's delta missing); None if fine."""
        return self.algorithm.check_result(result, specs)

    # -- aggregation -------------------------------------------------------------------------
    def init_state(self, parameters: Parameters) -> ServerState:
        privacy = self.privacy.init_state() if self.privacy is not None else {}
        return ServerState(self.server_optimizer.init(parameters.flat()), self.algorithm.init_state(parameters), privacy)

    def stop_reason(self, state: ServerState) -> str | None:
        """Why the run must end before the next round (a spent privacy budget), or None."""
        return self.privacy.stop_reason(state.privacy) if self.privacy is not None else None

    def account_failed_round(self, state: ServerState, num_clients: int, dim: int) -> ServerState:
        """The state after a round that released nothing because its aggregation failed: under central
        DP the accountant counts it all the same (conservative); otherwise unchanged."""
        if self.privacy is None:
            return state
        return ServerState(state.optimizer, state.algorithm,
                           self.privacy.after_failed_round(state.privacy, num_clients, dim))

    @property
    def withholds_client_facts(self) -> bool:
        """Under central DP (unless opted in): record nothing per client, as epsilon does not cover it."""
        return self.privacy is not None and not self.privacy.record_client_metrics

    def aggregate_fit(
        self,
        parameters: Parameters,
        server_state: ServerState | None,
        results: Iterable[tuple[str, FitResult]],
        num_clients: int = 0,
    ) -> Aggregate:
        """Fold results one by one (streaming) into new global parameters and server state.

        ``num_clients`` is the size of the federation this round (SCAFFOLD scales its control
        variate update by it); 0 means "the number of results". A None state starts a fresh one.
        Under central DP every round is released, even one without results (the noise / (q N)).
        """
        if server_state is None:
            server_state = self.init_state(parameters)
        global_flat = parameters.flat()
        algorithm = self.algorithm
        extras_acc = algorithm.start(global_flat.size)
        reducer, plan = self.round_reducer(server_state, num_clients, global_flat.size)
        props = reducer.properties
        # A shift-equivariant reducer (the mean) takes the client models as they are and the delta
        # is formed once at the end, instead of one subtraction per client.
        on_models = props.shift_equivariant
        acc = reducer.start(global_flat.size)
        metric_entries: list[tuple[int, Metrics]] = []
        for _cid, result in results:
            update = result.parameters.flat() if on_models else result.parameters.flat() - global_flat
            if on_models and props.needs_individual:
                update = update.copy()  # a buffering reducer keeps it; the result may be a shared view
            acc = reducer.add(acc, update, result.num_examples)
            extras_acc = algorithm.add(extras_acc, result)
            metric_entries.append((result.num_examples, result.metrics))
            del update, result  # released before the next result is fetched
        if not metric_entries and self.privacy is None:
            return Aggregate(None, server_state, {}, 0)
        delta, report = reducer.finish(acc)  # the delta is ours: transformed in place below
        del acc
        if on_models:
            np.subtract(delta, global_flat, out=delta)
        algorithm_state = algorithm.finish(extras_acc, server_state.algorithm, num_clients or len(metric_entries))
        return self._apply(parameters, server_state, delta, report, metric_entries, algorithm_state, num_clients, plan)

    def aggregate_secure_sum(self, parameters: Parameters, server_state: ServerState, total: np.ndarray,
                             metric_entries: list[tuple[int, Metrics]], *, num_clients: int) -> Aggregate:
        """Finish a round whose secure sum was computed over the network: decode ``total`` (the protocol's
        sum of the contributors' inputs) and run the same post-stages (noise, 1 / (q N)) as in simulation.

        ``metric_entries`` are the contributors' (num_examples, metrics). Only the decoded sum is used.
        """
        reducer, plan = self.round_reducer(server_state, num_clients, total.size - 1)
        stages = reducer if isinstance(reducer, Pipeline) else pipeline(reduce=reducer)
        if not isinstance(stages.reduce, SecureSum):
            raise TypeError(f"aggregate_secure_sum needs a strategy with secure_aggregation, got {reducer!r}")
        delta, report = stages.finish_post(*stages.reduce.decode(total, len(metric_entries)))
        algorithm_state = self.algorithm.finish(self.algorithm.start(delta.size), server_state.algorithm,
                                                num_clients or len(metric_entries))
        return self._apply(parameters, server_state, delta, report, metric_entries, algorithm_state, num_clients, plan)

    def _apply(self, parameters: Parameters, server_state: ServerState, delta: np.ndarray, report: Report,
               metric_entries: list[tuple[int, Metrics]], algorithm_state: AlgorithmState, num_clients: int,
               plan: RoundPlan | None) -> Aggregate:
        """Server optimizer step on the aggregated delta, privacy bookkeeping, round metrics."""
        new_flat, optimizer_state = self.server_optimizer.update(parameters.flat(), delta, server_state.optimizer)
        del delta
        new_params = Parameters.from_flat(new_flat, parameters.specs, copy=False)
        privacy, privacy_state = self.privacy, server_state.privacy
        # Client-reported metrics are not covered by epsilon: under DP only on explicit opt-in.
        metrics = {} if self.withholds_client_facts else weighted_average_metrics(metric_entries)
        contributors = int(report.get("contributors", len(metric_entries)))  # inputs that reached the (secure) sum
        if isinstance(privacy, DistributedDP):
            assert plan is not None  # planned by round_reducer
            privacy_state = privacy.after_round(privacy_state, plan, contributors=contributors)
        elif privacy is not None:
            privacy_state = privacy.after_round(privacy_state, int(report["within_clip"]),
                                                num_clients or len(metric_entries), contributors=contributors)
        if privacy is not None:
            metrics.update(epsilon=privacy.epsilon(privacy_state), clip_norm=float(privacy_state["clip_norm"][0]))
        return Aggregate(new_params, ServerState(optimizer_state, algorithm_state, privacy_state),
                         metrics, len(metric_entries), report)

    def round_reducer(self, state: ServerState, num_clients: int, dim: int) -> tuple[Reducer, RoundPlan | None]:
        """This round's aggregation pipeline, and distributed DP's round plan (None otherwise).

        Without privacy or secure aggregation: ``reducer`` itself. Otherwise DP's and secure
        aggregation's stages stand in for the (linear, checked at construction) mean:
        central DP ``clip(C) -> total() -> noise -> 1 / (q N)``, the sum through the protocol under
        secure aggregation (clients clip before masking), and distributed DP's noised secure sum.
        """
        privacy, secure = self.privacy, self.secure_aggregation
        if privacy is None:
            return (self.reducer if secure is None else secure.weighted_mean()), None
        if num_clients < 1:
            raise ValueError("DP divides by the expected number of clients q N: pass num_clients "
                             "(the federation's size) to aggregate_fit")
        if isinstance(privacy, DistributedDP):  # clients clip, round and noise before masking
            assert secure is not None  # refused at construction otherwise
            plan = privacy.plan(state.privacy, num_clients, dim)
            return pipeline(reduce=secure.distributed_sum(plan), post=[scale(1.0 / plan.denominator)]), plan
        clip_norm = float(state.privacy["clip_norm"][0])
        if secure is not None:
            return pipeline(reduce=secure.clipped_sum(clip_norm), post=privacy.release(state.privacy, num_clients)), None
        return pipeline(pre=[clip(clip_norm)], reduce=total(), post=privacy.release(state.privacy, num_clients)), None

    def aggregate_evaluate(self, results: Sequence[tuple[str, EvalResult]]) -> tuple[float | None, Metrics]:
        """Example-weighted mean loss and metrics; clients with no examples are left out."""
        usable = [r for _, r in results if r.num_examples > 0 and math.isfinite(r.loss)]
        if not usable:
            return None, {}
        total = sum(r.num_examples for r in usable)
        loss = sum(r.loss * r.num_examples for r in usable) / total
        return loss, weighted_average_metrics([(r.num_examples, r.metrics) for r in usable])

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, Metrics] | None:
        """Centralized evaluation on a server-side set, if an ``evaluate_fn`` was given."""
        return None if self.evaluate_fn is None else self.evaluate_fn(server_round, parameters)


def _sample(available: Sequence[str], k: int, rng: Generator) -> list[str]:
    """A uniform k-subset of ``available`` (in its order), in O(k) time and memory for k << N: only the
    drawn positions are looked up, so ``available`` may be a lazy sequence of a million ids.

    A numpy Generator draws with ``choice(N, k, replace=False)``, which is Floyd's algorithm when
    N > 10,000 and k <= N / 50 (numpy's own switch; otherwise it shuffles N positions, O(N)); the
    seeded draw sequence is the one numpy has always given. A CSPRNG (OS entropy, never seeded) runs Floyd's algorithm on k
    uniforms."""
    n = len(available)
    if k >= n:
        return list(available)
    if isinstance(rng, np.random.Generator):
        chosen = [int(i) for i in rng.choice(n, size=k, replace=False)]
    else:
        chosen = _floyd(n, k, np.asarray(rng.random(k)))
    return [available[i] for i in sorted(chosen)]


def _floyd(n: int, k: int, uniforms: np.ndarray) -> list[int]:
    """Floyd's algorithm: a uniform k-subset of range(n) from k uniforms in [0, 1), in O(k)
    (for j = n-k .. n-1 take t uniform in [0, j]; if t was taken already take j instead)."""
    chosen: set[int] = set()
    for j, u in zip(range(n - k, n), uniforms.tolist()):
        t = min(int(u * (j + 1)), j)
        chosen.add(j if t in chosen else t)
    return list(chosen)


def _resolve(source: ConfigSource, server_round: int) -> Config:
    return dict(source(server_round)) if callable(source) else dict(source)


def _privacy_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Under central DP every round is released: min_fit_clients defaults to 1 (the only valid value)."""
    if kwargs.get("privacy") is not None:
        kwargs.setdefault("min_fit_clients", 1)
    return kwargs


def fedavg(**kwargs: Any) -> Strategy:
    """FedAvg (McMahan et al. 2017): example-weighted average of the clients' models."""
    kwargs.setdefault("name", "fedavg")
    return Strategy(**_privacy_defaults(kwargs))


def fedprox(mu: float = 0.01, **kwargs: Any) -> Strategy:
    """FedProx (Li et al. 2020): FedAvg whose clients add the proximal term mu/2 ||w - w_global||^2."""
    kwargs.setdefault("name", "fedprox")
    return Strategy(algorithm=FedProx(mu=mu), **_privacy_defaults(kwargs))


def scaffold(**kwargs: Any) -> Strategy:
    """SCAFFOLD (Karimireddy et al. 2020): control variates correct client drift on non-IID data.

    The server step is the (weighted) mean of the client deltas times the server learning rate
    (``server_optimizer=sgd(lr)``, the paper's global step size eta_g)."""
    kwargs.setdefault("name", "scaffold")
    return Strategy(algorithm=Scaffold(), **kwargs)


def fedsgd(**kwargs: Any) -> Strategy:
    """FedSGD: each client takes one full-batch gradient step; averaging the models then equals one
    SGD step on the example-weighted average gradient. Extra fit config keys may be given."""
    base = kwargs.pop("fit_config", {})

    def config(server_round: int) -> Config:
        cfg = _resolve(base, server_round)
        cfg.update(local_epochs=1, batch_size=0)
        return cfg

    kwargs.setdefault("name", "fedsgd")
    return Strategy(fit_config=config, **_privacy_defaults(kwargs))
