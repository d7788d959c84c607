"""Local (example-level) DP: DPTorchClient trains with Opacus' DP-SGD and accounts epsilon per client."""

from __future__ import annotations

import copy

import dp_accounting
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from insitu.client import TorchClient, TrainSettings
from insitu.client.state import DiskState, MemoryStates
from insitu.data import load_dataset
from insitu.engines.base import Task, run_tasks
from insitu.engines.inprocess import InProcessPool
from insitu.models import build_model
from insitu.params import Parameters, _flat_storage, flatten_module_
from insitu.privacy.local import (
    DP_LEDGER,
    DPTorchClient,
    LocalDPSettings,
    PrivacyBudgetExceededError,
    UnsupportedModelError,
    dp_compatible_model,
    epsilon,
    sampling_plan,
)

OPACUS_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: with several threads on a busy machine, thread hand-offs cost more than the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def mlp(train, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", train.input_shape, train.num_classes)


def independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> tuple[float, float]:
    """Epsilon for the same run from a fresh Opacus RDPAccountant (step by step) and from dp_accounting."""
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    ours = accountant.get_epsilon(delta=delta)
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return ours, rdp.get_epsilon(delta)


def test_settings_are_validated() -> None:
    LocalDPSettings(1.0, 1.0)
    for bad in ((0.0, 1.0), (-1.0, 1.0), (float("nan"), 1.0), (1.0, 0.0), (1.0, 1.0, 0.0), (1.0, 1.0, 1.0),
                (1.0, 1.0, 1e-5, 0.0)):
        with pytest.raises(ValueError):
            LocalDPSettings(*bad)


def test_dp_training_learns_and_reports_rdp_epsilon(digits) -> None:
    train, test = digits
    model = mlp(train)
    settings = TrainSettings(local_epochs=3, batch_size=64, lr=0.5)
    dp = LocalDPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    client = DPTorchClient(model, train, test, dp=dp, settings=settings, rng_seed=0)
    start = Parameters.from_module(model)
    before = client.evaluate(start, {})
    result = client.fit(start, {"seed": 1})
    after = client.evaluate(result.parameters, {})
    assert after.loss < before.loss - 0.5
    assert after.metrics["accuracy"] > 0.6  # chance is 0.1
    assert "train_loss" not in result.metrics  # not noised: withheld unless asked for
    q, per_epoch = sampling_plan(len(train.y), settings)
    assert per_epoch == -(-len(train.y) // 64) and q == pytest.approx(1 / per_epoch)
    opacus_eps, dp_accounting_eps = independent_epsilon(1.0, q, 3 * per_epoch, 1e-5)
    assert result.metrics["epsilon"] == pytest.approx(opacus_eps, rel=0.01)
    assert result.metrics["epsilon"] == pytest.approx(dp_accounting_eps, rel=0.01)
    assert result.metrics["delta"] == 1e-5
    assert client.epsilon() == result.metrics["epsilon"]


def test_epsilon_accumulates_per_client_across_rebuilt_clients(digits) -> None:
    train, _ = digits
    model = mlp(train)
    flatten_module_(model)
    states = MemoryStates()
    parts = {"0": np.arange(0, 200), "1": np.arange(200, 400)}
    dp = LocalDPSettings(noise_multiplier=1.2, max_grad_norm=1.0)
    settings = TrainSettings(local_epochs=1, batch_size=20, lr=0.1)

    def client_fn(cid: str) -> DPTorchClient:  # rebuilt each round, as the simulation does
        return DPTorchClient(model, train, dp=dp, settings=settings, train_indices=parts[cid],
                             state=states.for_client(cid), share_result=True, rng_seed=int(cid))

    params = Parameters.from_module(model)
    eps0 = [client_fn("0").fit(params, {"seed": r}).metrics["epsilon"] for r in range(3)]
    eps1 = client_fn("1").fit(params, {"seed": 0}).metrics["epsilon"]
    assert eps0[0] < eps0[1] < eps0[2]
    assert eps1 == pytest.approx(eps0[0])  # same size, same settings, one round: its own ledger
    ledger = client_fn("0").ledger()
    assert len(ledger) == 1 and ledger[0][2] == 3 * 10  # merged: (sigma, q=1/10, 30 steps)
    assert eps0[2] == pytest.approx(independent_epsilon(1.2, 0.1, 30, 1e-5)[0], rel=0.01)
    assert states.for_client("0").load(DP_LEDGER).size == 3  # one small float vector per client


def test_ledger_survives_on_disk_and_settings_changes_are_accounted(digits, tmp_path) -> None:
    train, _ = digits
    model = mlp(train)
    dp = LocalDPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    rows = np.arange(100)
    first = DPTorchClient(model, train, dp=dp, settings=TrainSettings(batch_size=10), train_indices=rows,
                          state=DiskState(tmp_path))
    params = Parameters.from_module(model)
    eps_a = first.fit(params, {}).metrics["epsilon"]
    again = DPTorchClient(model, train, dp=dp, settings=TrainSettings(batch_size=10), train_indices=rows,
                          state=DiskState(tmp_path))  # a restarted client process
    eps_b = again.fit(params, {"batch_size": 25, "local_epochs": 2}).metrics["epsilon"]  # server changes q
    assert again.ledger() == [(1.0, pytest.approx(0.1), 10), (1.0, pytest.approx(0.25), 8)]
    assert eps_b > eps_a
    assert eps_b == pytest.approx(epsilon([(1.0, 0.1, 10), (1.0, 0.25, 8)], 1e-5), rel=1e-4)


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")  # sigma ~ 0: epsilon is huge, as it should be
def test_per_example_clipping_bounds_each_step(digits) -> None:
    """One full-batch step (q = 1, so no sampling) with negligible noise must equal -lr * mean_i clip_C(g_i),
    with each example's gradient g_i computed separately here and clipped as Opacus does
    (factor min(1, C / (||g_i|| + 1e-6))); hence ||step|| <= lr * C exactly, whatever the batch."""
    train, _ = digits
    model = mlp(train)
    rows = np.arange(16)
    lr, clip = 0.5, 1e-3
    client = DPTorchClient(model, train, dp=LocalDPSettings(noise_multiplier=1e-9, max_grad_norm=clip),
                           settings=TrainSettings(local_epochs=1, batch_size=0, lr=lr), train_indices=rows, rng_seed=0)
    start = Parameters.from_module(model)
    reference = copy.deepcopy(model)
    clipped, raw = [], []
    for i in rows:
        reference.zero_grad()
        nn.functional.cross_entropy(reference(train.x[i : i + 1]), train.y[i : i + 1]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
        raw.append(g)
        clipped.append(g * min(1.0, clip / (float(g.norm()) + 1e-6)))
    expected = -lr * torch.stack(clipped).mean(0)
    result = client.fit(start, {})
    names = [n for n, _ in model.named_parameters()]
    step = torch.cat([torch.from_numpy(dict(result.parameters)[n] - dict(start)[n]).reshape(-1) for n in names])
    assert float(step.norm()) <= lr * clip * (1 + 1e-4)
    assert torch.allclose(step, expected, atol=1e-7, rtol=1e-3)
    assert min(float(g.norm()) for g in raw) > 10 * clip  # every example really was clipped
    unclipped = -lr * torch.stack(raw).mean(0)
    assert float(unclipped.norm()) > 10 * float(step.norm())  # so without clipping the step would be far larger


def test_budget_refusal_names_spent_epsilon_and_budget(digits) -> None:
    train, _ = digits
    model = mlp(train)
    rows = np.arange(120)
    settings = TrainSettings(local_epochs=1, batch_size=12, lr=0.1)
    one = epsilon([(1.0, 0.1, 10)], 1e-5)
    two = epsilon([(1.0, 0.1, 20)], 1e-5)
    budget = (one + two) / 2
    states = MemoryStates()
    client = DPTorchClient(model, train, dp=LocalDPSettings(1.0, 1.0, target_epsilon=budget), settings=settings,
                           train_indices=rows, state=states.for_client("7"))
    params = Parameters.from_module(model)
    assert client.fit(params, {}).metrics["epsilon"] == pytest.approx(one)
    trained = Parameters.from_module(model)
    with pytest.raises(PrivacyBudgetExceededError, match="target_epsilon") as refused:
        client.fit(params, {})
    message = str(refused.value)
    assert f"{one:.4g}" in message and f"{budget:g}" in message
    assert client.epsilon() == pytest.approx(one)  # nothing was spent by the refused round
    assert Parameters.from_module(model) == trained  # refused before touching the model


def test_a_task_naming_an_unknown_algorithm_is_refused_before_it_spends_budget(digits) -> None:
    from insitu.algorithms import UnknownAlgorithmError

    train, _ = digits
    model = mlp(train)
    client = DPTorchClient(model, train, dp=LocalDPSettings(1.0, 1.0), settings=TrainSettings(batch_size=10),
                           train_indices=np.arange(50), state=MemoryStates().for_client("0"))
    with pytest.raises(UnknownAlgorithmError, match="upgrade insitu"):
        client.fit(Parameters.from_module(model), {"algorithm": "fedfuture"})
    assert client.ledger() == [] and client.epsilon() == 0.0


def test_refused_round_is_a_rejected_result_in_process(digits) -> None:
    train, _ = digits
    model = mlp(train)
    client = DPTorchClient(model, train, dp=LocalDPSettings(1.0, 1.0, target_epsilon=0.01),
                           settings=TrainSettings(batch_size=10), train_indices=np.arange(50))
    pool = InProcessPool(lambda cid: client, 1)
    [(cid, outcome)] = list(run_tasks(pool, "fit", Parameters.from_module(model), 0, [Task("0", {})]))
    assert cid == "0" and isinstance(outcome, PrivacyBudgetExceededError)


class BatchNormNet(nn.Module):
    """A model Opacus cannot train as is: BatchNorm mixes examples within a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x.flatten(1)))))


def test_batchnorm_is_refused_or_fixed(digits) -> None:
    train, _ = digits
    model = BatchNormNet()
    dp = LocalDPSettings(1.0, 1.0)
    with pytest.raises(UnsupportedModelError, match="BatchNorm") as refused:
        DPTorchClient(model, train, dp=dp)
    assert "fix_model=True" in str(refused.value)
    fixed = dp_compatible_model(model, fix=True)  # what the server must use as the global model
    assert isinstance(fixed.bn, nn.GroupNorm) and isinstance(model.bn, nn.BatchNorm1d)
    assert dp_compatible_model(model, fix=True) is fixed  # one fixed copy per shared model
    client = DPTorchClient(model, train, dp=dp, fix_model=True, settings=TrainSettings(batch_size=32),
                           train_indices=np.arange(200))
    assert client.model is fixed
    result = client.fit(Parameters.from_module(fixed), {})
    assert result.metrics["epsilon"] > 0 and "bn.running_mean" not in result.parameters.names
    assert dp_compatible_model(fixed) is fixed  # already compatible: returned as is


def test_shared_flat_model_stays_plain_between_dp_and_plain_clients(digits) -> None:
    train, test = digits
    model = mlp(train)
    assert flatten_module_(model)
    pristine = copy.deepcopy(model)
    names = Parameters.from_module(model).names
    states = MemoryStates()
    settings = TrainSettings(local_epochs=1, batch_size=25, lr=0.2)
    dp = LocalDPSettings(1.0, 1.0)
    clients = [DPTorchClient(model, train, test, dp=dp, settings=settings, train_indices=np.arange(i * 100, i * 100 + 100),
                             state=states.for_client(str(i)), share_result=True, rng_seed=i) for i in range(2)]
    glob = Parameters.from_module(model)
    kept = []
    for turn in (0, 1, 0, 1):
        result = clients[turn].fit(glob, {"seed": turn})
        kept.append((result, result.parameters.flat().copy()))
        assert Parameters.from_module(model) == result.parameters  # the shared model holds the trained weights
        assert not np.array_equal(result.parameters.flat(), glob.flat())
        assert _flat_storage(model) is not None  # still one flat buffer: nothing was re-seated
    for result, snapshot in kept:  # later fits did not overwrite earlier (shared-memory) results
        assert np.array_equal(result.parameters.flat(), snapshot)
    for p in model.parameters():
        assert not any(hasattr(p, a) for a in OPACUS_ATTRS) and p.grad is None
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
        assert not hasattr(m, "activations") and not hasattr(m, "autograd_grad_sample_hooks")
    assert clients[0].epsilon() > 0 and clients[0].epsilon() == clients[1].epsilon()  # same plan, own ledgers
    # A plain TorchClient on the same model now behaves exactly as on a model Opacus never touched.
    plain = TorchClient(model, train, settings=settings, train_indices=np.arange(300))
    control = TorchClient(pristine, train, settings=settings, train_indices=np.arange(300))
    got, want = plain.fit(glob, {"seed": 5}), control.fit(glob, {"seed": 5})
    assert got.parameters.names == names == Parameters.from_module(model).names
    assert np.allclose(got.parameters.flat(), want.parameters.flat(), atol=1e-6)
    assert got.metrics["train_loss"] == pytest.approx(want.metrics["train_loss"], rel=1e-5)
    # ... and DP clients can take their turn again afterwards.
    assert clients[0].fit(glob, {"seed": 9}).metrics["epsilon"] > kept[2][0].metrics["epsilon"]


def test_empty_poisson_batches_and_fedprox(digits) -> None:
    train, _ = digits
    model = mlp(train)
    client = DPTorchClient(model, train, dp=LocalDPSettings(1.0, 1.0), settings=TrainSettings(batch_size=1, lr=0.1),
                           train_indices=np.arange(6), rng_seed=3, report_train_loss=True)
    start = Parameters.from_module(model)
    for seed in range(5):  # q = 1/6 over 6 examples: about a third of the steps draw nobody
        result = client.fit(start, {"seed": seed, "algorithm": "fedprox", "proximal_mu": 0.1})
        assert np.all(np.isfinite(result.parameters.flat())) and np.isfinite(result.metrics["train_loss"])
    assert client.ledger() == [(1.0, pytest.approx(1 / 6), 30)]


def test_local_dp_is_on_by_configuration_in_simulation_and_survives_an_eval_mode_model():
    from insitu.simulation import SimulationConfig, run_simulation

    config = SimulationConfig(dataset="digits", model="mlp", num_clients=4, rounds=2, lr=0.1, local_epochs=1,
                              local_dp_noise=1.0, local_dp_clip=1.0)  # the central evaluation leaves eval mode
    _, result = run_simulation(config)
    rounds = result.history.rounds
    assert [r.status for r in rounds] == ["ok", "ok"]
    assert 0 < rounds[0].fit_metrics["epsilon"] < rounds[1].fit_metrics["epsilon"]
