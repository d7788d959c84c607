"""FedProx and SCAFFOLD: exact updates on quadratics, client state, and the same run over gRPC."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from insitu.algorithms import ALGORITHM, SCAFFOLD_C, SCAFFOLD_DELTA_C
from insitu.client.state import DiskState, MemoryStates
from insitu.client.torch_client import TorchClient, TrainSettings
from insitu.data.datasets import TensorDataset
from insitu.engines import InProcessPool
from insitu.params import Parameters
from insitu.run.loop import Coordinator
from insitu.strategies import ServerState, fedprox, scaffold


class HalfSquare(nn.Module):
    """0.5 (w x - t)^2 with x = 1: a quadratic whose gradient in w is w - t."""

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out.squeeze(1) - y.float()) ** 2).mean()


def scalar_model(w0: float = 0.0) -> nn.Linear:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(w0)
    return model


def target_client(model, target: int, steps: int, lr: float, state=None) -> TorchClient:
    data = TensorDataset(torch.ones(1, 1), torch.tensor([target]), 1, "quadratic")
    return TorchClient(model, data, settings=TrainSettings(local_epochs=steps, batch_size=0, lr=lr),
                       loss_fn=HalfSquare(), state=state)


def test_fedprox_local_steps_follow_the_proximal_gradient_in_closed_form():
    # grad = (w - t) + mu (w - x): K GD steps contract towards w* = (t + mu x) / (1 + mu).
    x, t, mu, lr, steps = 2.0, 5, 0.5, 0.1, 6
    model = scalar_model()
    client = target_client(model, t, steps, lr)
    start = Parameters.from_arrays({"weight": np.array([[x]], np.float32)})
    result = client.fit(start, {ALGORITHM: "fedprox", "proximal_mu": mu})
    w_star = (t + mu * x) / (1 + mu)
    expected = w_star + (1 - lr * (1 + mu)) ** steps * (x - w_star)
    assert result.parameters.flat()[0] == pytest.approx(expected, rel=1e-6)
    plain = target_client(scalar_model(), t, steps, lr).fit(start, {})
    assert plain.parameters.flat()[0] == pytest.approx(t + (1 - lr) ** steps * (x - t), rel=1e-6)


def test_two_fedprox_steps_on_a_linear_model_match_the_hand_computed_update():
    """theta = (w, b), loss 0.5 mean (A theta - y)^2 with A = [X, 1], so g(theta) = A^T (A theta - y) / n.
    Step 1 starts at the sent model (no pull yet); step 2 adds mu (theta_1 - theta_0)."""
    x = np.array([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]])
    y = np.array([1, 0, 2])
    theta0, lr, mu = np.array([0.5, -0.25, 0.1]), 0.1, 2.0
    model = nn.Linear(2, 1)
    data = TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y), 3, "linear")
    client = TorchClient(model, data, settings=TrainSettings(local_epochs=2, batch_size=0, lr=lr), loss_fn=HalfSquare())
    start = Parameters.from_arrays({"weight": np.array([theta0[:2]], np.float32), "bias": np.array([theta0[2]], np.float32)})
    got = client.fit(start, {ALGORITHM: "fedprox", "proximal_mu": mu}).parameters.flat()
    a = np.hstack([x, np.ones((3, 1))])

    def grad(theta: np.ndarray) -> np.ndarray:
        return a.T @ (a @ theta - y) / 3

    theta1 = theta0 - lr * grad(theta0)
    theta2 = theta1 - lr * (grad(theta1) + mu * (theta1 - theta0))
    assert np.allclose(got, theta2, rtol=1e-5, atol=1e-6)
    plain = TorchClient(nn.Linear(2, 1), data, settings=TrainSettings(local_epochs=2, batch_size=0, lr=lr),
                        loss_fn=HalfSquare()).fit(start, {}).parameters.flat()
    assert np.abs(plain - got).max() > 1e-3  # the proximal pull made a difference


def test_fedprox_client_told_fewer_epochs_takes_that_many_steps_towards_the_model_it_was_sent():
    """A systems model may send a slow client fewer local epochs than its default: it must take exactly
    those steps, each pulled towards the global model of this task (not whatever the shared model held)."""
    x, t, mu, lr = 2.0, 5, 0.5, 0.1
    model = scalar_model(-7.0)  # the shared model holds another client's weights before the task
    client = target_client(model, t, 6, lr)  # six one-step epochs by default
    start = Parameters.from_arrays({"weight": np.array([[x]], np.float32)})
    result = client.fit(start, {ALGORITHM: "fedprox", "proximal_mu": mu, "local_epochs": 2})
    w_star = (t + mu * x) / (1 + mu)
    assert result.parameters.flat()[0] == pytest.approx(w_star + (1 - lr * (1 + mu)) ** 2 * (x - w_star), rel=1e-6)


def test_fedprox_client_refuses_a_task_without_a_valid_mu():
    start = Parameters.from_arrays({"weight": np.zeros((1, 1), np.float32)})
    for config in ({ALGORITHM: "fedprox"}, {ALGORITHM: "fedprox", "proximal_mu": -1.0},
                   {ALGORITHM: "fedprox", "proximal_mu": float("nan")}):
        with pytest.raises(ValueError, match="mu >= 0"):
            target_client(scalar_model(), 1, 1, 0.1).fit(start, config)


def test_fedprox_strategy_sends_mu_and_refuses_negative_mu():
    strategy = fedprox(0.3)
    state = strategy.init_state(Parameters.from_arrays({"w": np.zeros(2, np.float32)}))
    assert strategy.algorithm_config(state, ()) == {ALGORITHM: "fedprox", "proximal_mu": 0.3}
    with pytest.raises(ValueError, match="mu >= 0"):
        fedprox(-0.1)


def test_scaffold_option_ii_matches_the_closed_form_over_rounds():
    """Three clients with quadratic losses 0.5 (w - t_i)^2, K corrected GD steps each, 3 rounds.

    With the correction, client i descends 0.5 (w - (t_i + c_i - c))^2, so after K steps from x:
    y_i = m_i + (1 - lr)^K (x - m_i) with m_i = t_i + c_i - c; then (option II)
    c_i+ = c_i - c + (x - y_i) / (K lr), x <- x + mean(y_i - x), c <- c + sum(c_i+ - c_i) / N.
    """
    targets, steps, lr, rounds = [1, 3, -2], 4, 0.1, 3
    model, states = scalar_model(), MemoryStates()

    def client_fn(cid: str) -> TorchClient:
        return target_client(model, targets[int(cid)], steps, lr, states.for_client(cid))

    strategy = scaffold(min_fit_clients=3, min_available_clients=3, fraction_evaluate=0.0)
    result = Coordinator(strategy, InProcessPool(client_fn, 3), num_rounds=rounds).run(Parameters.from_module(model))

    x, c, c_i = 0.0, 0.0, [0.0, 0.0, 0.0]
    for _ in range(rounds):
        deltas_y, deltas_c = [], []
        for i, t in enumerate(targets):
            m = t + c_i[i] - c
            y = m + (1 - lr) ** steps * (x - m)
            new_c_i = c_i[i] - c + (x - y) / (steps * lr)
            deltas_y.append(y - x)
            deltas_c.append(new_c_i - c_i[i])
            c_i[i] = new_c_i
        x += sum(deltas_y) / 3
        c += sum(deltas_c) / 3
    assert result.parameters.flat()[0] == pytest.approx(x, rel=1e-5)
    assert result.server_state.algorithm["c"][0] == pytest.approx(c, rel=1e-5)
    for i in range(3):
        assert states.for_client(str(i)).load("scaffold_c_i")[0] == pytest.approx(c_i[i], rel=1e-5)
    # with every client taking part, the server's c is the mean of the clients' c_i
    assert c == pytest.approx(sum(c_i) / 3)
    assert states.nbytes() == 3 * 4  # one float32 per client per model value: nothing else is kept


def test_scaffold_divides_the_control_variate_update_by_the_whole_federation():
    strategy = scaffold(fraction_fit=0.5, min_fit_clients=1, min_available_clients=1, fraction_evaluate=0.0)
    model, states = scalar_model(), MemoryStates()
    pool = InProcessPool(lambda cid: target_client(model, 2, 1, 0.5, states.for_client(cid)), 4)
    start = Parameters.from_module(model)
    record, _, state = Coordinator(strategy, pool, num_rounds=1).run_round(1, start, strategy.init_state(start))
    assert len(record.selected) == 2
    # each client: one step from 0 with grad -2, lr 0.5 -> y = 1, c_i+ = (0 - 1)/(1 * 0.5) = -2
    assert state.algorithm["c"][0] == pytest.approx(2 * -2.0 / 4)


def test_scaffold_needs_a_state_store():
    start = Parameters.from_arrays({"weight": np.zeros((1, 1), np.float32)})
    c = {ALGORITHM: "scaffold", SCAFFOLD_C: Parameters.from_arrays({"weight": np.zeros((1, 1), np.float32)})}
    with pytest.raises(ValueError, match="state store"):
        target_client(scalar_model(), 1, 1, 0.1).fit(start, c)


# -- SCAFFOLD's control variate with any local optimizer -----------------------------------------

def small_problem(seed: int = 0):
    """A 3-feature, 3-class softmax regression on 10 points: a nonlinear loss, two parameters."""
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(10, 3, generator=gen), torch.randint(0, 3, (10,), generator=gen), 3, "toy")
    model = nn.Linear(3, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    start = Parameters.from_module(model)
    c = Parameters.from_flat(torch.randn(start.num_values, generator=gen).numpy() * 0.3, start.specs)
    c_i = torch.randn(start.num_values, generator=gen).numpy().astype(np.float32) * 0.3
    return data, model, start, c, c_i


def run_scaffold_fit(settings: TrainSettings, seed: int = 0):
    """One SCAFFOLD fit from a stored c_i and a server c (both nonzero); returns what the test needs."""
    data, model, start, c, c_i = small_problem(seed)
    state = MemoryStates().for_client("0")
    state.save("scaffold_c_i", c_i)
    result = TorchClient(model, data, settings=settings, state=state).fit(start, {ALGORITHM: "scaffold", SCAFFOLD_C: c, "seed": 3})
    new_c_i = state.load("scaffold_c_i")
    assert np.allclose(result.extras[SCAFFOLD_DELTA_C].flat(), new_c_i - c_i, atol=1e-7)
    return data, start, c.flat(), c_i, result.parameters.flat(), new_c_i


def replay(data, start: Parameters, c: np.ndarray, c_i: np.ndarray, steps: int, lr: float, momentum: float = 0.0,
           weight_decay: float = 0.0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Full-batch local training written out by hand: raw gradient g, corrected g - c_i + c, then
    heavy-ball SGD with weight decay. Returns (final weights, the raw gradients in order)."""
    w = torch.from_numpy(start.flat().copy()).requires_grad_(True)
    correction = torch.from_numpy(c - c_i)
    velocity, raw = torch.zeros_like(w), []
    for _ in range(steps):
        weight, bias = w[:9].view(3, 3), w[9:]
        loss = nn.functional.cross_entropy(data.x @ weight.T + bias, data.y)
        (g,) = torch.autograd.grad(loss, w)
        raw.append(g.numpy())
        d = g + correction + weight_decay * w.detach()
        velocity = momentum * velocity + d
        w = (w.detach() - lr * velocity).requires_grad_(True)
    return w.detach().numpy(), raw


def heavy_ball_weights(steps: int, momentum: float) -> np.ndarray:
    """How many lr-steps the k-th gradient moves the model by the end of the round under heavy-ball SGD
    (momentum reset at the start): 1 + b + ... + b^(K-k)."""
    return np.array([sum(momentum**j for j in range(steps - k)) for k in range(steps)])


def test_scaffold_control_variate_is_option_ii_under_plain_sgd():
    """Minibatch SGD (shuffled batches of 4 out of 10, so K = 3 x 3 steps): the stored c_i+ equals
    option II's c_i - c + (x - y) / (K lr), computed from the distance the model moved."""
    lr, epochs = 0.2, 3
    _, start, c, c_i, y, new_c_i = run_scaffold_fit(TrainSettings(local_epochs=epochs, batch_size=4, lr=lr))
    steps = epochs * 3
    option_ii = c_i - c + (start.flat() - y) / (steps * lr)
    assert np.abs(start.flat() - y).max() > 0.1  # the model moved: the comparison is not 0 == 0
    assert np.allclose(new_c_i, option_ii, rtol=1e-4, atol=1e-5)


def test_scaffold_control_variate_under_momentum_is_option_ii_with_the_effective_step_count():
    """Minibatch heavy-ball SGD (momentum 0.9, K = 9 steps): the model moves lr S (c_i+ + c - c_i),
    S = sum_k (1 + b + ... + b^(K-k)) the steps' weights, so c_i+ = c_i - c + (x - y) / (S lr).
    Option II's K in place of S would make c_i+ several times too large."""
    lr, epochs, momentum = 0.05, 3, 0.9
    _, start, c, c_i, y, new_c_i = run_scaffold_fit(
        TrainSettings(local_epochs=epochs, batch_size=4, lr=lr, momentum=momentum))
    steps = epochs * 3
    effective = heavy_ball_weights(steps, momentum).sum()
    assert effective == pytest.approx(34.87, abs=0.01)  # against K = 9
    assert np.allclose(new_c_i, c_i - c + (start.flat() - y) / (effective * lr), rtol=1e-4, atol=1e-5)
    option_ii = c_i - c + (start.flat() - y) / (steps * lr)
    assert np.abs(option_ii - new_c_i).max() > 0.1


def test_scaffold_control_variate_with_momentum_and_weight_decay_weights_each_gradient_by_its_move():
    """With momentum 0.9 and weight decay, c_i+ is the raw (uncorrected, decay-free) gradients averaged
    with the heavy-ball weights 1 + b + ... + b^(K-k): the first gradient counts about 5 times as much
    as the last here. The unweighted mean is a different (and worse, see docs/algorithms.md) value."""
    lr, steps, momentum, decay = 0.05, 6, 0.9, 0.01
    settings = TrainSettings(local_epochs=steps, batch_size=0, lr=lr, momentum=momentum, weight_decay=decay)
    data, start, c, c_i, y, new_c_i = run_scaffold_fit(settings)
    expected_y, raw = replay(data, start, c, c_i, steps, lr, momentum, decay)
    assert np.allclose(y, expected_y, atol=1e-5)  # the corrected gradient went through momentum as written
    weights = heavy_ball_weights(steps, momentum)
    assert np.allclose(new_c_i, np.average(raw, axis=0, weights=weights), atol=1e-5)
    assert np.abs(new_c_i - np.mean(raw, axis=0)).max() > 1e-3


def test_scaffold_control_variate_with_adam_is_the_mean_bias_corrected_first_moment():
    """Adam's steps are about equally long, each along its bias-corrected first moment
    m_j / (1 - b1^j), m_j = sum_k<=j (1 - b1) b1^(j-k) g_k: c_i+ is the mean of those over the steps."""
    lr, steps = 0.01, 4
    data, start, c, c_i, y, new_c_i = run_scaffold_fit(
        TrainSettings(local_epochs=steps, batch_size=0, lr=lr, optimizer="adam"))
    w = torch.from_numpy(start.flat().copy()).requires_grad_(True)
    adam = torch.optim.Adam([w], lr=lr)
    raw = []
    for _ in range(steps):
        adam.zero_grad()
        nn.functional.cross_entropy(data.x @ w[:9].view(3, 3).T + w[9:], data.y).backward()
        raw.append(w.grad.numpy().copy())
        w.grad += torch.from_numpy(c - c_i)
        adam.step()
    assert np.allclose(y, w.detach().numpy(), atol=1e-6)
    b1 = adam.param_groups[0]["betas"][0]
    moments = [sum((1 - b1) * b1 ** (j - k) * raw[k] for k in range(j + 1)) / (1 - b1 ** (j + 1)) for j in range(steps)]
    assert np.allclose(new_c_i, np.mean(moments, axis=0), atol=1e-6)


def test_simulate_accepts_scaffold_with_adam():
    from insitu.simulation import SimulationConfig

    SimulationConfig(dataset="digits", strategy="scaffold", optimizer="adam", lr=0.003).validate()


def test_scaffold_with_local_dp_keeps_option_ii_on_the_noised_gradients():
    """DP-SGD (Opacus) hands the hook the clipped, noised gradient: c_i+ is their mean, which under
    plain SGD is again option II's value. Averaging released gradients costs no extra privacy."""
    from insitu.privacy.local import DPTorchClient, LocalDPSettings

    data, model, start, c, c_i = small_problem()
    lr, epochs = 0.1, 2
    state = MemoryStates().for_client("0")
    state.save("scaffold_c_i", c_i)
    client = DPTorchClient(model, data, dp=LocalDPSettings(noise_multiplier=1.0, max_grad_norm=1.0),
                           settings=TrainSettings(local_epochs=epochs, batch_size=5, lr=lr), state=state, rng_seed=1)
    y = client.fit(start, {ALGORITHM: "scaffold", SCAFFOLD_C: c, "seed": 0}).parameters.flat()
    new_c_i = state.load("scaffold_c_i")
    option_ii = c_i - c.flat() + (start.flat() - y) / (epochs * 2 * lr)
    assert np.abs(start.flat() - y).max() > 0.05
    assert np.allclose(new_c_i, option_ii, rtol=1e-4, atol=1e-5)


def test_scaffold_server_c_is_the_example_weighted_mean_of_the_client_deltas():
    """c must be the gradient of the objective the (example-weighted) model step descends."""
    from insitu.client.api import FitResult
    from insitu.strategies.algorithms import Scaffold

    specs = Parameters.from_arrays({"w": np.zeros(2, np.float32)}).specs
    results = [FitResult(Parameters.from_flat(np.zeros(2, np.float32), specs), n,
                         extras={SCAFFOLD_DELTA_C: Parameters.from_flat(np.array(d, np.float32), specs)})
               for n, d in [(1, [4.0, 0.0]), (3, [0.0, 8.0])]]
    state = {"c": np.array([1.0, 1.0], np.float32)}
    for algorithm, num_clients, expected in [
        (Scaffold(), 2, [1 + 4 / 4, 1 + 24 / 4]),  # everyone took part: c moves by sum n_i dc_i / sum n_i
        (Scaffold(), 8, [1 + 0.25 * 4 / 4, 1 + 0.25 * 24 / 4]),  # 2 of 8 clients: scaled by the share 2/8
        (Scaffold(weighted=False), 8, [1 + 4 / 8, 1 + 8 / 8]),  # the paper's plain sum / N
    ]:
        acc = algorithm.start(2)
        for result in results:
            acc = algorithm.add(acc, result)
        assert np.allclose(algorithm.finish(acc, state, num_clients)["c"], expected)


def test_scaffold_with_momentum_is_not_worse_than_fedavg_on_non_iid_digits():
    """The digits preset trains with momentum 0.9; option II's update then made SCAFFOLD diverge
    (27% against FedAvg's 84% here). 10 clients, Dirichlet alpha 0.1, 4 rounds of 3 epochs."""
    from insitu.simulation import SimulationConfig, run_simulation

    final = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: thread hand-offs would cost more than the maths
    try:
        for strategy in ("fedavg", "scaffold"):
            config = SimulationConfig(dataset="digits", model="mlp", num_clients=10, rounds=4, local_epochs=3,
                                      batch_size=32, lr=0.1, momentum=0.9, partition="dirichlet", alpha=0.1,
                                      strategy=strategy, seed=0)
            final[strategy] = run_simulation(config)[1].history.final_accuracy
    finally:
        torch.set_num_threads(threads)
    assert final["fedavg"] > 0.75
    assert final["scaffold"] >= final["fedavg"]


def test_scaffold_result_without_its_delta_is_rejected_and_the_round_goes_on():
    from insitu.client.api import FitResult

    model, states = scalar_model(), MemoryStates()

    class Forgetful:
        def fit(self, parameters, config):
            return FitResult(Parameters.from_arrays({"weight": np.ones((1, 1), np.float32)}), 1)

        def evaluate(self, parameters, config):
            raise NotImplementedError

    def client_fn(cid):
        return Forgetful() if cid == "0" else target_client(model, 1, 1, 0.1, states.for_client(cid))

    strategy = scaffold(min_fit_clients=1, min_available_clients=1, fraction_evaluate=0.0)
    start = Parameters.from_module(model)
    record, _, _ = Coordinator(strategy, InProcessPool(client_fn, 2), num_rounds=1).run_round(
        1, start, strategy.init_state(start))
    assert record.status == "ok" and record.num_results == 1
    assert "scaffold_delta_c" in record.failures[0]["reason"] and record.failures[0]["client"] == "0"


def test_disk_state_round_trips_and_refuses_damaged_files_and_bad_names(tmp_path):
    state = DiskState(tmp_path / "client-a")
    assert state.load("scaffold_c_i") is None
    state.save("scaffold_c_i", np.arange(5, dtype=np.float32))
    again = DiskState(tmp_path / "client-a")
    assert np.array_equal(again.load("scaffold_c_i"), np.arange(5))
    assert sorted(p.name for p in (tmp_path / "client-a").iterdir()) == ["scaffold_c_i.insitu"]
    (tmp_path / "client-a" / "scaffold_c_i.insitu").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="delete it"):
        again.load("scaffold_c_i")
    with pytest.raises(ValueError, match="letters, digits"):
        again.save("../escape", np.zeros(1))


def test_disk_state_is_read_back_by_a_new_process(tmp_path):
    import subprocess
    import sys

    DiskState(tmp_path).save("scaffold_c_i", np.array([1.5, -2.0, 3.25], np.float32))
    code = ("import sys; from insitu.client.state import DiskState; "
            "print(DiskState(sys.argv[1]).load('scaffold_c_i').tolist())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[1.5, -2.0, 3.25]"


def test_disk_state_save_that_fails_midway_leaves_the_old_state_and_no_temporary_file(tmp_path, monkeypatch):
    import insitu.files

    state = DiskState(tmp_path)
    state.save("scaffold_c_i", np.ones(4, np.float32))

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(insitu.files.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        state.save("scaffold_c_i", np.full(4, 7, np.float32))
    monkeypatch.undo()
    assert np.array_equal(state.load("scaffold_c_i"), np.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["scaffold_c_i.insitu"]


def test_server_state_round_trips_through_named_arrays():
    state = ServerState({"m": np.ones(3, np.float32), "v": np.full(3, 2, np.float32)}, {"c": np.zeros(3, np.float32)})
    again = ServerState.from_arrays(state.to_arrays())
    assert set(again.optimizer) == {"m", "v"} and np.array_equal(again.algorithm["c"], np.zeros(3))
    assert ServerState.from_arrays(ServerState().to_arrays()) == ServerState(None, {})
    with pytest.raises(ValueError, match="unknown server state"):
        ServerState.from_arrays({"stray": np.zeros(1)})


def test_scaffold_runs_the_same_over_grpc_as_in_process():
    from insitu.net.client import connect
    from insitu.net.server import FederationServer, ServerSettings
    from insitu.simulation import SimulationConfig, build_experiment, simulate

    config = SimulationConfig(dataset="digits", model="mlp", num_clients=3, rounds=3, lr=0.1, min_fit_clients=3,
                              seed=5, strategy="scaffold", partition="dirichlet", alpha=0.3)
    local = build_experiment(config)
    expected = simulate(local.client_fn, num_clients=3, strategy=local.strategy, num_rounds=3,
                        initial_parameters=local.initial_parameters, seed=5)
    remote = build_experiment(config)
    remote.strategy.min_available_clients = 3
    server = FederationServer(ServerSettings(address="127.0.0.1:0", insecure=True, heartbeat_interval_s=0.5))
    for i in range(3):
        client = build_experiment(config).client_fn(str(i))  # one client object (and state) per "process"
        threading.Thread(target=connect, args=(client, f"127.0.0.1:{server.port}"),
                         kwargs={"client_id": str(i), "poll_wait_s": 0.5}, daemon=True).start()
    try:
        got = server.run(remote.strategy, remote.initial_parameters, num_rounds=3, seed=5)
    finally:
        server.stop(grace_s=2)
    assert [r.status for r in got.history.rounds] == ["ok"] * 3
    assert np.abs(got.server_state.algorithm["c"]).max() > 0
    # results may arrive in another order over the network: float32 sums then differ by ulps
    assert np.allclose(got.parameters.flat(), expected.parameters.flat(), rtol=1e-5, atol=1e-6)
    assert np.allclose(got.server_state.algorithm["c"], expected.server_state.algorithm["c"], rtol=1e-5, atol=1e-6)


def test_result_extras_travel_in_order_whatever_the_chunking():
    from insitu.net import payload
    from insitu.protocols import plain
    from insitu.protocols.envelope import Envelope

    main = Parameters.from_arrays({"w": np.arange(7, dtype=np.float32)})
    extras = {"a": Parameters.from_arrays({"w": np.ones(7, np.float32)}),
              "b": Parameters.from_arrays({"z": np.arange(3, dtype=np.int64)})}
    head = payload.header(Envelope("fit", parameters=main, arrays=extras), "task")
    blob = b"".join(payload.iter_body(Envelope("fit", parameters=main, arrays=extras), 64))
    for cut in (1, 5, 13, len(blob)):
        decoder = payload.BodyDecoder(head, max_bytes=1 << 20, expected=main.specs)
        for i in range(0, len(blob), cut):
            decoder.feed(blob[i : i + cut])
        got, got_extras, _ = decoder.finish()
        assert got == main and list(got_extras) == ["a", "b"] and got_extras["b"] == extras["b"]
    decoder = payload.BodyDecoder(head, max_bytes=1 << 20)
    decoder.feed(blob[:-3])
    with pytest.raises(ValueError, match="ended early"):
        decoder.finish()
    decoder = payload.BodyDecoder(head, max_bytes=1 << 20)
    with pytest.raises(ValueError, match="more payload bytes"):
        decoder.feed(blob + b"x")
    with pytest.raises(ValueError, match="exceeds the limit"):
        payload.BodyDecoder(head, max_bytes=len(blob) - 1)
    task = plain.task_envelope("fit", main, 0, {"lr": 0.1, SCAFFOLD_C: main})
    assert task.config == {"lr": 0.1} and list(task.arrays) == [SCAFFOLD_C]
    assert SCAFFOLD_DELTA_C == "scaffold_delta_c"
