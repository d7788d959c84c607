"""The round loop with hand-made clients: aggregation wiring, bad results, failed rounds."""

import logging

import numpy as np
import pytest

from insitu.client.api import EvalResult, FitResult
from insitu.engines import InProcessPool, NotEnoughClientsError
from insitu.params import Parameters
from insitu.run import Coordinator
from insitu.simulation import simulate
from insitu.strategies import fedavg

GLOBAL = Parameters.from_arrays({"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)})


class FixedClient:
    """Returns preset parameters and example count; evaluates to a preset loss/accuracy."""

    def __init__(self, w, n=10, eval_loss=1.0, eval_acc=0.5, eval_n=10):
        self.w, self.n, self.eval = w, n, (eval_loss, eval_acc, eval_n)

    def fit(self, parameters, config):
        params = Parameters.from_arrays({"w": np.asarray(self.w, np.float32), "b": np.ones(1, np.float32)})
        return FitResult(params, self.n, {"train_loss": float(self.n)})

    def evaluate(self, parameters, config):
        loss, acc, n = self.eval
        return EvalResult(loss, n, {"accuracy": acc})


class BadClient:
    def __init__(self, make):
        self.make = make

    def fit(self, parameters, config):
        return self.make()

    def evaluate(self, parameters, config):
        return EvalResult(0.0, 0, {})


def _params(**arrays):
    return Parameters.from_arrays(arrays)


BAD_RESULTS = {
    "shape": (lambda: FitResult(_params(w=np.zeros(4, np.float32), b=np.zeros(1, np.float32)), 5), "has shape (4,), expected (3,)"),
    "dtype": (lambda: FitResult(_params(w=np.zeros(3, np.float64), b=np.zeros(1, np.float32)), 5), "dtype float64, expected float32"),
    "names": (lambda: FitResult(_params(v=np.zeros(3, np.float32), b=np.zeros(1, np.float32)), 5), "named 'v'"),
    "nan": (lambda: FitResult(_params(w=np.array([0, np.nan, 0], np.float32), b=np.zeros(1, np.float32)), 5), "'w' contains NaN or Inf"),
    "inf": (lambda: FitResult(_params(w=np.zeros(3, np.float32), b=np.array([np.inf], np.float32)), 5), "'b' contains NaN or Inf"),
    "zero examples": (lambda: FitResult(GLOBAL, 0), "num_examples=0"),
    "negative examples": (lambda: FitResult(GLOBAL, -3), "num_examples=-3"),
    "wrong type": (lambda: {"w": 1}, "returned dict, expected FitResult"),
    "exception": (lambda: 1 / 0, "ZeroDivisionError"),
}


def _run(clients, rounds=1, **strategy_kwargs):
    kwargs = dict(min_fit_clients=1, min_available_clients=1, fraction_evaluate=1.0)
    kwargs.update(strategy_kwargs)
    return simulate(lambda cid: clients[int(cid)], num_clients=len(clients), strategy=fedavg(**kwargs),
                    num_rounds=rounds, initial_parameters=GLOBAL, seed=0)


def test_fedavg_through_the_loop_with_weighted_federated_evaluation():
    clients = [FixedClient([1, 2, 3], n=1, eval_loss=2.0, eval_acc=1.0, eval_n=1),
               FixedClient([5, 6, 7], n=3, eval_loss=1.0, eval_acc=0.0, eval_n=3)]
    result = _run(clients)
    assert np.allclose(dict(result.parameters)["w"], [4, 5, 6])
    record = result.history.rounds[0]
    assert record.status == "ok" and record.num_results == 2 and record.failures == []
    assert record.federated.loss == pytest.approx(1.25)  # (1*2 + 3*1) / 4
    assert record.federated.accuracy == pytest.approx(0.25)
    assert record.fit_metrics["train_loss"] == pytest.approx(2.5)
    assert record.clients["1"]["num_examples"] == 3 and record.clients["0"]["eval_accuracy"] == 1.0
    assert {"fit_s", "evaluate_s", "total_s"} <= set(record.timings)


@pytest.mark.parametrize("case", sorted(BAD_RESULTS))
def test_bad_result_is_rejected_with_reason_and_round_goes_on(case, caplog):
    make, reason = BAD_RESULTS[case]
    clients = [FixedClient([1, 1, 1]), BadClient(make), FixedClient([3, 3, 3])]
    with caplog.at_level(logging.WARNING, logger="insitu"):
        result = _run(clients)
    record = result.history.rounds[0]
    assert record.status == "ok" and record.num_results == 2
    assert np.allclose(dict(result.parameters)["w"], [2, 2, 2])
    assert record.failures[0]["client"] == "1" and reason in record.failures[0]["reason"]
    assert "client 1" in caplog.text and reason in caplog.text


def test_too_few_usable_results_fails_the_round_clearly_and_keeps_the_model(caplog):
    clients = [FixedClient([1, 1, 1]), BadClient(BAD_RESULTS["nan"][0]), BadClient(BAD_RESULTS["exception"][0])]
    with caplog.at_level(logging.ERROR, logger="insitu"):
        result = _run(clients, rounds=2, min_fit_clients=2, min_available_clients=3)
    for record in result.history.rounds:
        assert record.status == "failed"
        assert "only 1 usable results of 3 (min_fit_clients=2)" in record.error
        assert "client 1: array 'w' contains NaN" in record.error
    assert result.parameters == GLOBAL
    assert result.history.failed_rounds == [1, 2]
    assert "min_fit_clients=2" in caplog.text


def test_not_enough_clients_names_the_fix():
    with pytest.raises(NotEnoughClientsError, match="needs 5 available clients but the simulation has 2"):
        _run([FixedClient([0, 0, 0])] * 2, min_fit_clients=5, min_available_clients=5)


def test_round_callback_and_client_config_carry_round_and_seed():
    seen = []

    class Recorder(FixedClient):
        def fit(self, parameters, config):
            seen.append((config["round"], config["seed"], config["lr"]))
            return super().fit(parameters, config)

    rounds = []
    strategy = fedavg(min_fit_clients=1, min_available_clients=1, fraction_evaluate=0.0, fit_config=lambda r: {"lr": 0.1 * r})
    pool = InProcessPool(lambda cid: Recorder([0, 0, 0]), 2)
    Coordinator(strategy, pool, num_rounds=2, seed=3, on_round=lambda rec, p, s: rounds.append(rec.round)).run(GLOBAL)
    assert rounds == [1, 2]
    assert [s[0] for s in seen] == [1, 1, 2, 2]
    assert seen[0][2] == pytest.approx(0.1) and seen[2][2] == pytest.approx(0.2)
    assert len({s[1] for s in seen}) == 4  # a different seed per client and round


def test_a_protocol_that_aborts_its_round_fails_that_round_only_and_the_loop_knows_it_by_base_class():
    """The loop catches insitu.errors.RoundAborted, not a protocol's own exception by name."""
    from insitu.errors import RoundAborted
    from insitu.protocols.plain import PlainExchange

    class LostTooMany(RoundAborted):
        pass

    class AbortsRoundOne(PlainExchange):
        def fit(self, engine, round_):
            if round_.server_round == 1:
                raise LostTooMany("3 of 5 clients left, the protocol needs 4")
            return super().fit(engine, round_)

    clients = [FixedClient([2, 2, 2]), FixedClient([4, 4, 4])]
    pool = InProcessPool(lambda cid: clients[int(cid)], 2)
    result = Coordinator(fedavg(min_fit_clients=1, min_available_clients=1), pool, num_rounds=2, seed=0,
                         protocol=AbortsRoundOne(), evaluate_initial=False).run(GLOBAL)
    first, second = result.history.rounds
    assert first.status == "failed" and "3 of 5 clients left" in first.error
    assert second.status == "ok" and np.allclose(dict(result.parameters)["w"], [3, 3, 3])
