import numpy as np
import pytest
import torch
from torch import nn

from insitu.client.torch_client import TorchClient, TrainSettings, evaluate_model
from insitu.data import TensorDataset
from insitu.params import Parameters
from insitu.strategies import fedsgd


def _data(n=40, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorDataset(x, y, 2, "toy")


def _model():
    torch.manual_seed(0)
    return nn.Linear(5, 2)


def test_settings_overridden_by_server_config():
    s = TrainSettings(lr=0.01, local_epochs=1)
    t = s.updated({"lr": 0.5, "local_epochs": 3, "round": 2, "seed": 9})
    assert (t.lr, t.local_epochs, t.batch_size) == (0.5, 3, 32)
    assert s.updated({"unrelated": 1}) is s


@pytest.mark.parametrize("kwargs, message", [({"optimizer": "rmsprop"}, "unknown optimizer"),
                                             ({"loss": "hinge"}, "unknown loss"), ({"lr": 0}, "lr must be > 0")])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**kwargs)


def test_fit_is_deterministic_by_seed_and_trains_only_its_rows():
    model, data = _model(), _data()
    start = Parameters.from_module(model)
    client = TorchClient(model, data, train_indices=np.arange(10, 30), settings=TrainSettings(lr=0.1, batch_size=4))
    a = client.fit(start, {"seed": 1})
    b = client.fit(start, {"seed": 1})
    c = client.fit(start, {"seed": 2})
    assert a.num_examples == 20 and a.parameters == b.parameters and a.parameters != c.parameters
    assert a.metrics["train_loss"] > 0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_reduces_loss(optimizer):
    model, data = _model(), _data(200)
    start = Parameters.from_module(model)
    client = TorchClient(model, data, data, settings=TrainSettings(lr=0.05, local_epochs=5, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0))
    before = client.evaluate(start, {})
    after = client.evaluate(client.fit(start, {}).parameters, {})
    assert after.loss < before.loss and after.metrics["accuracy"] > 0.8 and after.num_examples == 200


def test_fedsgd_equals_one_gradient_step_on_the_weighted_average_gradient():
    data = _data(30)
    model = _model()
    start = Parameters.from_module(model)
    parts = [np.arange(0, 10), np.arange(10, 30)]
    lr = 0.3
    strategy = fedsgd(min_fit_clients=2, min_available_clients=2)
    cfg = {**strategy.fit_config_for(1), "lr": lr}
    results = [(str(i), TorchClient(model, data, train_indices=p).fit(start, cfg)) for i, p in enumerate(parts)]
    new = strategy.aggregate_fit(start, None, results).parameters
    # reference: one SGD step on the mean loss over all 30 examples (= example-weighted mean gradient)
    start.to_module(model)
    loss = nn.functional.cross_entropy(model(data.x), data.y)
    loss.backward()
    with torch.no_grad():
        expected = [p - lr * p.grad for p in model.parameters()]
    for got, want in zip(new.arrays, expected):
        assert np.allclose(got, want.numpy(), atol=1e-6)


def test_empty_client_reports_zero_examples_and_evaluate_without_test_set():
    model = _model()
    client = TorchClient(model, _data(), train_indices=np.array([], dtype=np.int64))
    res = client.fit(Parameters.from_module(model), {})
    assert res.num_examples == 0
    assert client.evaluate(Parameters.from_module(model), {}).num_examples == 0


def test_evaluate_model_counts():
    model, data = _model(), _data(50)
    loss, acc, n = evaluate_model(model, data, batch_size=7)
    with torch.no_grad():
        out = model(data.x)
    assert n == 50 and acc == pytest.approx(float((out.argmax(1) == data.y).float().mean()))
    assert loss == pytest.approx(float(nn.functional.cross_entropy(out, data.y)), rel=1e-5)


class CountingLoss(nn.Module):
    """Cross-entropy that counts its calls: one per optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return nn.functional.cross_entropy(out, y)


def test_a_task_asking_for_one_epoch_gets_exactly_one_epoch_of_steps():
    """The server may send a client fewer (or more) local epochs than its own settings (a systems model
    does for slow clients): the loop runs exactly the task's epochs, ceil(40 / 16) = 3 steps each."""
    model, data = _model(), _data(40)
    loss = CountingLoss()
    client = TorchClient(model, data, settings=TrainSettings(local_epochs=5, batch_size=16, lr=0.1), loss_fn=loss)
    start = Parameters.from_module(model)
    for config, steps in (({"local_epochs": 1}, 3), ({}, 15), ({"local_epochs": 2.0}, 6), ({"local_epochs": 0}, 0)):
        loss.calls = 0
        result = client.fit(start, config)
        assert loss.calls == steps, config
    assert result.parameters == start  # zero epochs: the model it was sent, untouched
    with pytest.raises(ValueError, match="whole number"):
        client.fit(start, {"local_epochs": 1.5})


def test_stragglers_take_the_steps_the_systems_model_planned_for_them():
    """The systems model gives a straggler fewer local epochs in its task config and times it by
    epochs x ceil(examples / batch); the client's loop must take exactly those steps, FedProx included."""
    from insitu.algorithms import FedProx
    from insitu.engines.systems import SystemsModel, epochs_times_batches

    model, data = _model(), _data(40)
    loss = CountingLoss()
    client = TorchClient(model, data, settings=TrainSettings(local_epochs=4, batch_size=16, lr=0.1), loss_fn=loss)
    start = Parameters.from_module(model)
    steps = epochs_times_batches({"0": 40}, 16, 4)
    systems = SystemsModel(straggler_fraction=0.5, local_epochs=4, steps=steps)
    config = FedProx(mu=0.1).fit_config({}, start.specs)
    planned = [systems.plan("0", config, task).config for task in range(8)]
    assert {c.get("local_epochs", 4) for c in planned} - {4}  # some tasks were cut short
    for task_config in planned:
        loss.calls = 0
        client.fit(start, task_config)
        assert loss.calls == steps("0", task_config)
