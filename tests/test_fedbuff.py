"""FedBuff (buffered asynchronous FL) and the systems model, with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from insitu.client.api import EvalResult, FitResult
from insitu.engines import InProcessPool, SystemsModel, Task
from insitu.engines.systems import ClientDroppedOut, StragglerDropped, epochs_times_batches
from insitu.params import Parameters
from insitu.privacy.central import CentralDP
from insitu.privacy.secure import SecureAggregation
from insitu.run.fedbuff import AsyncCoordinator, FedBuff
from insitu.simulation import SimulationConfig, run_simulation
from insitu.strategies import fedavg, scaffold


def vec(x) -> Parameters:
    return Parameters.from_arrays({"w": np.asarray(x, np.float32)})


class StepClient:
    """Moves the model it was given by a fixed step: update = step (whatever the model)."""

    def __init__(self, step, n: int = 1) -> None:
        self.step, self.n = np.asarray(step, np.float32), n
        self.seen: list[np.ndarray] = []

    def fit(self, parameters, config):
        w = dict(parameters)["w"]
        self.seen.append(w.copy())
        return FitResult(vec(w + self.step), self.n, {})

    def evaluate(self, parameters, config):
        return EvalResult(0.0, 0, {})


class FailingClient(StepClient):
    def fit(self, parameters, config):
        raise RuntimeError("disk on fire")


def run_fedbuff(clients, fedbuff, steps, systems=None, **strategy):
    engine = InProcessPool(lambda cid: clients[int(cid)], len(clients), systems=systems)
    coordinator = AsyncCoordinator(fedbuff_strategy(**strategy), engine, fedbuff, num_rounds=steps, seed=3)
    return coordinator.run(vec([0.0, 0.0]))


def fedbuff_strategy(**kwargs):
    kwargs.setdefault("min_fit_clients", 1)
    kwargs.setdefault("min_available_clients", 1)
    return fedavg(**kwargs)


# -- staleness weighting -----------------------------------------------------------------------
def test_staleness_weight_is_one_over_sqrt_one_plus_s_by_default():
    fb = FedBuff()
    assert [fb.staleness_weight(s) for s in (0, 1, 3)] == pytest.approx([1.0, 1 / math.sqrt(2), 0.5])
    assert FedBuff(staleness_exponent=0).staleness_weight(7) == 1.0
    assert FedBuff(buffer_size=4).clients_at_once(100) == 8 and FedBuff(buffer_size=4).clients_at_once(6) == 6
    assert FedBuff(buffer_size=4, concurrency=5).clients_at_once(100) == 5


@pytest.mark.parametrize("bad", [dict(buffer_size=0), dict(concurrency=-1), dict(staleness_exponent=-0.5),
                                 dict(staleness_exponent=float("nan")), dict(max_staleness=-1)])
def test_bad_fedbuff_settings_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        FedBuff(**bad)


# -- the policy, by hand ------------------------------------------------------------------------
def test_one_at_a_time_is_sequential_sgd():
    """K = 1, concurrency 1: no update is ever stale, each step adds one client's step in turn."""
    clients = [StepClient([1.0, 0.0]), StepClient([0.0, 2.0])]
    result = run_fedbuff(clients, FedBuff(buffer_size=1, concurrency=1), steps=4)
    w = dict(result.parameters)["w"]
    total = sum(len(c.seen) for c in clients)
    assert total == 4
    expected = len(clients[0].seen) * np.array([1.0, 0.0]) + len(clients[1].seen) * np.array([0.0, 2.0])
    np.testing.assert_allclose(w, expected)
    assert [r.fit_metrics["staleness_max"] for r in result.history.rounds] == [0, 0, 0, 0]


def test_stale_updates_are_scaled_and_folded_onto_the_current_model():
    """Two clients start on version 0 (equal speeds: client 0 finishes first, then client 1).

    K = 1: step 1 takes client 0's update fresh: w1 = (1, 0). Client 1 trained from w0 = 0 and is one
    version stale when it lands: w2 = w1 + (0, 2) / sqrt(2)."""
    clients = [StepClient([1.0, 0.0]), StepClient([0.0, 2.0])]
    result = run_fedbuff(clients, FedBuff(buffer_size=1, concurrency=2), steps=2, systems=SystemsModel())
    np.testing.assert_allclose(dict(result.parameters)["w"], [1.0, 2 / math.sqrt(2)], rtol=1e-6)
    assert [r.fit_metrics["staleness_max"] for r in result.history.rounds] == [0, 1]
    assert result.history.rounds[1].clients["1"]["staleness"] == 1


def test_a_buffer_of_k_is_the_weighted_mean_of_its_updates():
    """K = 2 with fresh updates of weight 1 and 3: one step moves by (1 x a + 3 x b) / 4."""
    clients = [StepClient([4.0, 0.0], n=1), StepClient([0.0, 4.0], n=3)]
    result = run_fedbuff(clients, FedBuff(buffer_size=2, concurrency=2), steps=1, systems=SystemsModel())
    np.testing.assert_allclose(dict(result.parameters)["w"], [1.0, 3.0])
    assert result.history.rounds[0].num_results == 2


def test_updates_beyond_max_staleness_are_rejected_with_the_reason():
    clients = [StepClient([1.0, 0.0]), StepClient([0.0, 1.0]), StepClient([1.0, 1.0])]
    result = run_fedbuff(clients, FedBuff(buffer_size=1, concurrency=3, max_staleness=1), steps=4,
                         systems=SystemsModel())
    reasons = [f["reason"] for r in result.history.rounds for f in r.failures]
    assert any("2 versions stale (max_staleness=1)" in reason for reason in reasons)


def test_failing_clients_are_rejected_and_replaced(caplog):
    clients = [FailingClient([0, 0]), StepClient([1.0, 0.0]), StepClient([0.0, 1.0])]
    result = run_fedbuff(clients, FedBuff(buffer_size=1, concurrency=2), steps=5)
    assert len(result.history.rounds) == 5 and all(r.status == "ok" for r in result.history.rounds)
    assert any("disk on fire" in f["reason"] for r in result.history.rounds for f in r.failures)


def test_a_step_the_reducer_refuses_fails_and_leaves_the_model_unchanged(caplog):
    """Krum with f = 1 needs 5 updates; a buffer of 2 is refused, the step recorded as failed, the run goes on."""
    from insitu.aggregation import krum

    clients = [StepClient([1.0, 0.0]), StepClient([0.0, 1.0])]
    result = run_fedbuff(clients, FedBuff(buffer_size=2, concurrency=2), steps=2, reducer=krum(1))
    assert [r.status for r in result.history.rounds] == ["failed", "failed"]
    assert "needs n > 2f + 2" in result.history.rounds[0].error
    np.testing.assert_array_equal(dict(result.parameters)["w"], [0.0, 0.0])


def test_passing_failures_of_every_client_do_not_end_the_run():
    """K = N: when every client but the buffered ones has failed its last task, they get another chance
    (a dropout is passing); only failures that repeat end the run."""
    class Flaky(StepClient):
        calls = 0

        def fit(self, parameters, config):
            Flaky.calls += 1
            if Flaky.calls % 3 == 0:
                raise RuntimeError("network blip")
            return super().fit(parameters, config)

    clients = [Flaky([1.0, 0.0]) for _ in range(3)]
    result = run_fedbuff(clients, FedBuff(buffer_size=3, concurrency=3), steps=4)
    assert len(result.history.rounds) == 4 and any(r.failures for r in result.history.rounds)


def test_the_systems_model_draws_do_not_depend_on_evaluation_tasks():
    """Federated evaluation used to shift every later straggler/dropout draw: a plan is keyed by the round."""
    model = SystemsModel(dropout=0.3, straggler_fraction=0.5, local_epochs=4, seed=1)

    def plans(evaluate: bool):
        engine = InProcessPool(lambda cid: StepClient([1.0, 0.0]), 4, systems=model)
        seen = []
        for round_ in (1, 2, 3):
            if evaluate:
                engine.submit("evaluate", vec([0.0, 0.0]), round_, [Task(str(i), {"round": round_}) for i in range(4)])
            engine.submit("fit", vec([0.0, 0.0]), round_, [Task(str(i), {"round": round_}) for i in range(4)])
            seen += [(r.client_id, r.finished_at, type(r.outcome).__name__) for r in engine.results() if r.kind == "fit"]
        return seen

    assert plans(evaluate=False) == plans(evaluate=True)


def test_when_every_client_fails_the_run_stops_instead_of_retrying_forever():
    clients = [FailingClient([0, 0]), FailingClient([0, 0])]
    with pytest.raises(RuntimeError, match="cannot fill its buffer"):
        run_fedbuff(clients, FedBuff(buffer_size=1, concurrency=1), steps=2)


@pytest.mark.parametrize("strategy", [
    lambda: fedavg(privacy=CentralDP(1.0, 1.0, 0.5), min_available_clients=1),
    lambda: fedavg(secure_aggregation=SecureAggregation(10.0), min_fit_clients=1, min_available_clients=1),
    lambda: scaffold(min_fit_clients=1, min_available_clients=1),
], ids=["central-dp", "secure-aggregation", "scaffold"])
def test_strategies_that_assume_synchronous_rounds_are_refused(strategy):
    engine = InProcessPool(lambda cid: StepClient([1.0, 0.0]), 2)
    with pytest.raises(ValueError, match="FedBuff with .* is not supported"):
        AsyncCoordinator(strategy(), engine, FedBuff(buffer_size=1), num_rounds=1).run(vec([0.0, 0.0]))


def fast(client_id: str):
    """Client "0" is 100 times faster than the others (a systems model: 1 local step against 100)."""
    return SystemsModel(steps=lambda cid, config: 1 if cid == client_id else 100)


def test_one_fast_client_cannot_fill_the_buffer():
    """A buffer holds one update per client: a client answering at once (an attacker pushing its update
    through every robust rule's f) gets no new task until the step, so every step has K distinct clients."""
    clients = [StepClient([100.0, 100.0])] + [StepClient([0.01, 0.01]) for _ in range(3)]
    from insitu.aggregation import coordinate_median

    result = run_fedbuff(clients, FedBuff(buffer_size=3, concurrency=4), steps=3, systems=fast("0"),
                         reducer=coordinate_median())
    for step in result.history.rounds:
        assert len(step.selected) == 3 and len(set(step.selected)) == 3
    assert np.all(dict(result.parameters)["w"] < 1.0)  # the median of 3 distinct clients: the attacker is outvoted


def test_a_fast_failing_client_does_not_end_the_run():
    """A client that fails at once waits for the next step instead of being handed task after task."""
    clients = [FailingClient([0, 0])] + [StepClient([1.0, 0.0]) for _ in range(3)]
    result = run_fedbuff(clients, FedBuff(buffer_size=2, concurrency=4), steps=4, systems=fast("0"))
    assert [r.status for r in result.history.rounds] == ["ok"] * 4
    failures = [f for r in result.history.rounds for f in r.failures]
    assert 1 <= len(failures) <= 4 and all(f["client"] == "0" for f in failures)  # at most once per step


def test_client_metrics_cannot_overwrite_what_the_server_measured():
    class Liar(StepClient):
        def fit(self, parameters, config):
            result = super().fit(parameters, config)
            result.metrics.update(staleness=0.0, num_examples=1e9)
            return result

    result = run_fedbuff([Liar([1.0, 0.0]), Liar([0.0, 1.0])], FedBuff(buffer_size=1, concurrency=2), steps=2,
                         systems=SystemsModel())
    recorded = result.history.rounds[1].clients["1"]
    assert recorded["staleness"] == 1 and recorded["num_examples"] == 1


# -- the systems model --------------------------------------------------------------------------
def test_speeds_are_log_normal_with_median_one_and_fixed_per_client():
    model = SystemsModel(speed_sigma=0.8, seed=5)
    logs = np.log([model.speed(str(i)) for i in range(4000)])
    assert abs(np.median(logs)) < 0.05 and abs(logs.std() - 0.8) < 0.05
    assert model.speed("17") == SystemsModel(speed_sigma=0.8, seed=5).speed("17")
    assert SystemsModel().speed("17") == 1.0


def test_a_task_takes_latency_plus_its_steps_over_the_speed():
    steps = epochs_times_batches({"a": 95}, default_batch=10, default_epochs=2)
    model = SystemsModel(speed_sigma=0.5, step_seconds=0.1, latency=3.0, steps=steps)
    plan = model.plan("a", {}, 0)
    assert plan.duration == pytest.approx(3.0 + 2 * 10 * 0.1 / model.speed("a"))
    assert model.plan("a", {"local_epochs": 1}, 0).duration == pytest.approx(3.0 + 10 * 0.1 / model.speed("a"))


def test_stragglers_do_fewer_epochs_or_are_dropped():
    model = SystemsModel(straggler_fraction=0.5, local_epochs=5, seed=1)
    plans = [model.plan(str(i), {}, 0) for i in range(400)]
    fewer = [p.config["local_epochs"] for p in plans if "local_epochs" in p.config]
    assert 150 < len(fewer) < 250 and set(fewer) <= {1, 2, 3, 4} and len(set(fewer)) == 4
    dropping = SystemsModel(straggler_fraction=0.5, local_epochs=5, drop_stragglers=True, seed=1)
    failures = [dropping.plan(str(i), {}, 0).failure for i in range(400)]
    assert sum(isinstance(f, StragglerDropped) for f in failures) == len(fewer)


def test_dropouts_happen_at_the_configured_rate():
    model = SystemsModel(dropout=0.2, seed=2)
    dropped = sum(isinstance(model.plan(str(i), {}, 0).failure, ClientDroppedOut) for i in range(2000))
    assert 330 < dropped < 470


@pytest.mark.parametrize("bad", [dict(speed_sigma=-1), dict(step_seconds=0), dict(dropout=1.0),
                                 dict(straggler_fraction=-0.1), dict(latency=float("inf"))])
def test_bad_systems_settings_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SystemsModel(**bad)


def test_the_engine_returns_results_in_simulated_finish_order():
    model = SystemsModel(speed_sigma=1.0, seed=4)
    engine = InProcessPool(lambda cid: StepClient([1.0, 0.0]), 6, systems=model)
    engine.submit("fit", vec([0.0, 0.0]), 0, [Task(str(i), {}) for i in range(6)])
    finished = [(r.client_id, r.finished_at) for r in engine.results()]
    assert [t for _, t in finished] == sorted(t for _, t in finished)
    assert [c for c, _ in finished] == sorted((str(i) for i in range(6)), key=lambda c: 1 / model.speed(c))
    assert engine.clock() == pytest.approx(max(0.01 / model.speed(str(i)) for i in range(6)))


# -- end to end ---------------------------------------------------------------------------------
def config(**kwargs) -> SimulationConfig:
    base = dict(dataset="digits", model="logreg", num_clients=12, fraction_fit=0.25, rounds=6, lr=0.1, seed=2,
                speed_sigma=1.0, buffer_size=3, concurrency=6)
    if kwargs.get("mode") == "fedbuff":
        base["fraction_fit"] = 1.0  # FedBuff's concurrency stands in for it
    return SimulationConfig(**{**base, **kwargs})


def test_fedbuff_simulation_is_reproducible_bit_for_bit_and_learns():
    _, first = run_simulation(config(mode="fedbuff"))
    _, again = run_simulation(config(mode="fedbuff"))
    assert first.parameters == again.parameters
    rounds = first.history.rounds
    assert len(rounds) == 6 and rounds[-1].accuracy > 0.5
    clocks = [r.timings["clock_s"] for r in rounds]
    assert clocks == sorted(clocks) and clocks[0] > 0


def test_sync_rounds_wait_for_the_slowest_client_and_fedbuff_does_not():
    _, sync = run_simulation(config(mode="sync", rounds=4))
    _, fedbuff = run_simulation(config(mode="fedbuff", rounds=4))
    # the same number of client updates per step (3): FedBuff's steps end sooner in simulated time
    assert fedbuff.history.rounds[-1].timings["clock_s"] < sync.history.rounds[-1].timings["clock_s"]


def test_bad_mode_and_impossible_concurrency_are_refused_before_training():
    from insitu.simulation import build_experiment

    with pytest.raises(ValueError, match="unknown mode 'async'"):
        build_experiment(config(mode="async"))
    with pytest.raises(ValueError, match="lower concurrency"):
        build_experiment(config(mode="fedbuff", concurrency=50))
    with pytest.raises(ValueError, match="lower buffer_size"):
        build_experiment(config(mode="fedbuff", buffer_size=20, concurrency=0))
    with pytest.raises(ValueError, match="could never fill its buffer"):
        build_experiment(config(mode="fedbuff", buffer_size=8, concurrency=4))
    with pytest.raises(ValueError, match="set fraction_evaluate to 0"):
        build_experiment(config(mode="fedbuff", fraction_evaluate=0.5))
    with pytest.raises(ValueError, match="drop fraction_fit"):
        build_experiment(config(mode="fedbuff", fraction_fit=0.5))
    for bad in (dict(speed_sigma=-1.0), dict(dropout=1.5), dict(latency=-2.0), dict(straggler_fraction=-0.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):  # a negative setting is refused, not ignored
            build_experiment(config(mode="sync", **bad))
