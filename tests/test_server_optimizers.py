"""Server optimizers: hand-stepped two-round checks, state persistence, argument validation."""

from __future__ import annotations

from math import sqrt

import numpy as np
import pytest

from insitu import serde
from insitu.client.api import FitResult
from insitu.params import Parameters
from insitu.run.history import RoundRecord
from insitu.run.store import RunStore
from insitu.strategies import (
    SERVER_OPTIMIZER_NAMES,
    ServerAdaptive,
    ServerMomentum,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedyogi,
    make_server_optimizer,
    sgd,
)
from insitu.strategies.strategy import ServerState

X0 = [1.0, -2.0]
D1 = [0.5, -1.0]
# Second coordinate's D2^2 = 0.0039 is below v_1 there, so Yogi's sign term is +1 in round 2 for it
# and -1 everywhere else: both branches are exercised.
D2 = [-0.25, 0.0625]


def _two_rounds(opt):
    x = np.array(X0, np.float32)
    state = opt.init(x)
    x1, state = opt.update(x, np.array(D1, np.float32), state)
    x1 = x1.copy()
    x2, state = opt.update(x1, np.array(D2, np.float32), state)
    return x1, x2, state


def test_fedadam_defaults_hand_stepped():
    x1, x2, state = _two_rounds(fedadam())  # lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3
    # v_{-1} = tau^2 = 1e-6, m_{-1} = 0
    m1 = [0.9 * 0.0 + (1 - 0.9) * 0.5, 0.9 * 0.0 + (1 - 0.9) * -1.0]
    v1 = [0.99 * 1e-6 + (1 - 0.99) * 0.5**2, 0.99 * 1e-6 + (1 - 0.99) * (-1.0) ** 2]
    e1 = [1.0 + 0.1 * m1[0] / (sqrt(v1[0]) + 1e-3), -2.0 + 0.1 * m1[1] / (sqrt(v1[1]) + 1e-3)]
    m2 = [0.9 * m1[0] + (1 - 0.9) * -0.25, 0.9 * m1[1] + (1 - 0.9) * 0.0625]
    v2 = [0.99 * v1[0] + (1 - 0.99) * (-0.25) ** 2, 0.99 * v1[1] + (1 - 0.99) * 0.0625**2]
    e2 = [e1[0] + 0.1 * m2[0] / (sqrt(v2[0]) + 1e-3), e1[1] + 0.1 * m2[1] / (sqrt(v2[1]) + 1e-3)]
    np.testing.assert_allclose(x1, e1, rtol=1e-6)
    np.testing.assert_allclose(x2, e2, rtol=1e-6)
    np.testing.assert_allclose(state["m"], m2, rtol=1e-6)
    np.testing.assert_allclose(state["v"], v2, rtol=1e-6)


def test_fedyogi_defaults_hand_stepped():
    x1, x2, state = _two_rounds(fedyogi())  # lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3
    # round 1: v_{-1} = 1e-6 < D1^2 in both coordinates, so sign(v - D^2) = -1
    m1 = [0.9 * 0.0 + (1 - 0.9) * 0.5, 0.9 * 0.0 + (1 - 0.9) * -1.0]
    v1 = [1e-6 - (1 - 0.99) * 0.5**2 * -1, 1e-6 - (1 - 0.99) * (-1.0) ** 2 * -1]
    e1 = [1.0 + 0.1 * m1[0] / (sqrt(v1[0]) + 1e-3), -2.0 + 0.1 * m1[1] / (sqrt(v1[1]) + 1e-3)]
    # round 2: v1[0] = 0.002501 < 0.0625 (sign -1); v1[1] = 0.010001 > 0.00390625 (sign +1)
    assert v1[0] < (-0.25) ** 2 and v1[1] > 0.0625**2
    m2 = [0.9 * m1[0] + (1 - 0.9) * -0.25, 0.9 * m1[1] + (1 - 0.9) * 0.0625]
    v2 = [v1[0] - (1 - 0.99) * (-0.25) ** 2 * -1, v1[1] - (1 - 0.99) * 0.0625**2 * +1]
    e2 = [e1[0] + 0.1 * m2[0] / (sqrt(v2[0]) + 1e-3), e1[1] + 0.1 * m2[1] / (sqrt(v2[1]) + 1e-3)]
    np.testing.assert_allclose(x1, e1, rtol=1e-6)
    np.testing.assert_allclose(x2, e2, rtol=1e-6)
    np.testing.assert_allclose(state["m"], m2, rtol=1e-6)
    np.testing.assert_allclose(state["v"], v2, rtol=1e-6)


def test_fedadagrad_defaults_hand_stepped():
    x1, x2, state = _two_rounds(fedadagrad())  # lr=0.1, beta1=0 (m_t = D_t), tau=1e-3
    v1 = [1e-6 + 0.5**2, 1e-6 + (-1.0) ** 2]
    e1 = [1.0 + 0.1 * 0.5 / (sqrt(v1[0]) + 1e-3), -2.0 + 0.1 * -1.0 / (sqrt(v1[1]) + 1e-3)]
    v2 = [v1[0] + (-0.25) ** 2, v1[1] + 0.0625**2]
    e2 = [e1[0] + 0.1 * -0.25 / (sqrt(v2[0]) + 1e-3), e1[1] + 0.1 * 0.0625 / (sqrt(v2[1]) + 1e-3)]
    np.testing.assert_allclose(x1, e1, rtol=1e-6)
    np.testing.assert_allclose(x2, e2, rtol=1e-6)
    assert set(state) == {"v"}  # no first moment kept when beta1 = 0
    np.testing.assert_allclose(state["v"], v2, rtol=1e-6)


def test_fedadagrad_with_momentum_hand_stepped():
    x1, x2, _ = _two_rounds(fedadagrad(lr=0.5, beta1=0.5, tau=1e-2))
    m1 = [(1 - 0.5) * 0.5, (1 - 0.5) * -1.0]
    v1 = [1e-4 + 0.5**2, 1e-4 + (-1.0) ** 2]
    e1 = [1.0 + 0.5 * m1[0] / (sqrt(v1[0]) + 1e-2), -2.0 + 0.5 * m1[1] / (sqrt(v1[1]) + 1e-2)]
    m2 = [0.5 * m1[0] + (1 - 0.5) * -0.25, 0.5 * m1[1] + (1 - 0.5) * 0.0625]
    v2 = [v1[0] + (-0.25) ** 2, v1[1] + 0.0625**2]
    e2 = [e1[0] + 0.5 * m2[0] / (sqrt(v2[0]) + 1e-2), e1[1] + 0.5 * m2[1] / (sqrt(v2[1]) + 1e-2)]
    np.testing.assert_allclose(x1, e1, rtol=1e-6)
    np.testing.assert_allclose(x2, e2, rtol=1e-6)


def test_fedavgm_defaults_hand_stepped():
    x1, x2, state = _two_rounds(fedavgm())  # lr=1, momentum=0.9
    v1 = [0.9 * 0.0 + 0.5, 0.9 * 0.0 + -1.0]
    e1 = [1.0 + 1.0 * v1[0], -2.0 + 1.0 * v1[1]]
    v2 = [0.9 * v1[0] + -0.25, 0.9 * v1[1] + 0.0625]
    e2 = [e1[0] + 1.0 * v2[0], e1[1] + 1.0 * v2[1]]
    np.testing.assert_allclose(x1, e1, rtol=1e-6)
    np.testing.assert_allclose(x2, e2, rtol=1e-6)
    np.testing.assert_allclose(state["momentum"], v2, rtol=1e-6)


def test_fedavgm_lr_hand_stepped():
    x1, x2, _ = _two_rounds(fedavgm(lr=0.5, momentum=0.5))
    v1 = [0.5 * 0.0 + 0.5, 0.5 * 0.0 + -1.0]
    e1 = [1.0 + 0.5 * v1[0], -2.0 + 0.5 * v1[1]]
    v2 = [0.5 * v1[0] + -0.25, 0.5 * v1[1] + 0.0625]
    e2 = [e1[0] + 0.5 * v2[0], e1[1] + 0.5 * v2[1]]
    np.testing.assert_allclose(x1, e1, rtol=1e-6)
    np.testing.assert_allclose(x2, e2, rtol=1e-6)


def test_sgd_one_is_params_plus_delta():
    x = np.array([1.0, -2.0, 3.5], np.float32)
    d = np.array([0.25, 0.5, -1.0], np.float32)
    new, state = sgd(1.0).update(x, d.copy(), sgd(1.0).init(x))
    assert state is None
    assert np.array_equal(new, x + d)


def test_adaptive_optimizer_inside_a_strategy():
    g = Parameters.from_arrays({"w": np.array(X0, np.float32)})
    client = FitResult(Parameters.from_arrays({"w": np.array(X0, np.float32) + np.array(D1, np.float32)}), 10)
    strategy = fedavg(server_optimizer=fedadam())
    out = strategy.aggregate_fit(g, strategy.init_state(g), [("a", client)])
    direct, state = fedadam().update(np.array(X0, np.float32), np.array(D1, np.float32), fedadam().init(g.flat()))
    assert np.array_equal(dict(out.parameters)["w"], direct)
    assert np.array_equal(out.server_state.optimizer["m"], state["m"])


OPTIMIZERS = {
    "fedavgm": fedavgm(),
    "fedadam": fedadam(),
    "fedyogi": fedyogi(),
    "fedadagrad": fedadagrad(),
    "fedadagrad_momentum": fedadagrad(beta1=0.9),
}


def _rounds(opt, x, state, deltas):
    for d in deltas:
        x, state = opt.update(x, d.copy(), state)
        x = x.copy()
    return x, state


def _assert_same(a, b):
    assert np.array_equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert a[1][k].dtype == np.float32 and np.array_equal(a[1][k], b[1][k])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_round_trip_continues_bit_identically(name, tmp_path):
    opt = OPTIMIZERS[name]
    rng = np.random.default_rng(0)
    x = rng.normal(size=1000).astype(np.float32)
    deltas = [rng.normal(scale=0.1, size=1000).astype(np.float32) for _ in range(4)]
    x, state = _rounds(opt, x, opt.init(x), deltas[:2])
    assert isinstance(state, dict) and all(isinstance(v, np.ndarray) for v in state.values())
    snapshot = {k: v.copy() for k, v in state.items()}

    live = _rounds(opt, x, state, deltas[2:])
    for k in state:  # update never modifies the state it is given (a failed round keeps it)
        assert np.array_equal(state[k], snapshot[k])

    # the store's own path: ServerState -> named arrays -> serde bytes -> back
    blob = serde.dumps(Parameters.from_arrays(ServerState(optimizer=state).to_arrays()))
    in_memory = ServerState.from_arrays(dict(serde.loads(blob))).optimizer
    _assert_same(_rounds(opt, x, in_memory, deltas[2:]), live)

    store = RunStore(tmp_path / "run.db")
    store.save_round(RoundRecord(round=2), Parameters.from_arrays({"w": x}), ServerState(optimizer=state))
    store.close()
    last, params, _, loaded = RunStore(tmp_path / "run.db").load()
    assert last == 2
    _assert_same(_rounds(opt, dict(params)["w"], loaded.optimizer, deltas[2:]), live)


def test_state_from_another_optimizer_is_refused():
    x = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="keys"):
        fedadam().update(x, np.ones(3, np.float32), fedavgm().init(x))
    with pytest.raises(ValueError, match="shape"):
        fedadam().update(x, np.ones(3, np.float32), fedadam().init(np.zeros(4, np.float32)))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: fedadam(beta1=1.0), r"beta1 must be in \[0, 1\), got 1.0"),
        (lambda: fedyogi(beta2=-0.1), r"beta2 must be in \[0, 1\), got -0.1"),
        (lambda: fedadagrad(tau=0.0), r"tau must be a finite number > 0, got 0.0"),
        (lambda: fedadam(lr=0.0), r"server learning rate must be a finite number > 0, got 0.0"),
        (lambda: fedadam(lr=float("inf")), r"server learning rate must be a finite number > 0, got inf"),
        (lambda: fedavgm(momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
        (lambda: fedavgm(lr=-1.0), r"server learning rate must be a finite number > 0, got -1.0"),
        (lambda: ServerAdaptive("rmsprop"), r"adaptive kind must be one of"),
        (lambda: sgd(0.0), r"server learning rate must be > 0, got 0.0"),
    ],
)
def test_bad_arguments_fail_clearly(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_make_server_optimizer_by_name():
    assert SERVER_OPTIMIZER_NAMES == ("sgd", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
    assert make_server_optimizer("sgd") == sgd(1.0)
    assert make_server_optimizer("fedavgm", lr=0.5, momentum=0.7) == ServerMomentum(0.5, 0.7)
    assert make_server_optimizer("fedadam") == fedadam()
    assert make_server_optimizer("fedyogi", lr=0.01, tau=1e-2) == fedyogi(lr=0.01, tau=1e-2)
    assert make_server_optimizer("fedadagrad") == fedadagrad()
    assert make_server_optimizer("fedadagrad", beta1=0.9).beta1 == 0.9
    with pytest.raises(ValueError, match="valid names: sgd, fedavgm, fedadam, fedyogi, fedadagrad"):
        make_server_optimizer("adam")
