"""Attack simulation: update attacks, MaliciousClient, label flipping and the pixel backdoor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from insitu.attacks import (
    ATTACK_NAMES,
    GaussianNoise,
    MaliciousClient,
    Scaling,
    SignFlip,
    Trigger,
    attack_success_rate,
    choose_malicious,
    flip_labels,
    gaussian_noise,
    make_update_attack,
    poison_with_backdoor,
    scaling,
    sign_flip,
    triggered_test_set,
    validate_attack,
)
from insitu.client.api import EvalResult, FitResult
from insitu.client.torch_client import TorchClient, TrainSettings
from insitu.data.datasets import TensorDataset
from insitu.params import Parameters, ParamSpec, flatten_module_

GLOBAL_W = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
TRAINED_W = np.array([[1.5, 2.0], [2.0, 4.25]], dtype=np.float32)  # delta = [0.5, 0, -1, 0.25]


def tiny_global() -> Parameters:
    return Parameters.from_arrays({"w": GLOBAL_W.copy(), "count": np.array(5, dtype=np.int64)})


class FixedClient:
    """Returns fixed trained weights and an int64 counter, as a training step would."""

    def __init__(self) -> None:
        self.evaluated = 0

    def fit(self, parameters: Parameters, config: dict) -> FitResult:
        trained = Parameters.from_arrays({"w": TRAINED_W.copy(), "count": np.array(6, dtype=np.int64)})
        return FitResult(trained, 7, {"train_loss": 0.5})

    def evaluate(self, parameters: Parameters, config: dict) -> EvalResult:
        self.evaluated += 1
        return EvalResult(0.25, 3, {"accuracy": 0.75})


class SharedMemoryClient:
    """Like the simulation: trains in one shared buffer and returns a view of it."""

    def __init__(self, memory: np.ndarray, specs: tuple[ParamSpec, ...], delta: np.ndarray) -> None:
        self.memory, self.specs, self.delta = memory, specs, delta

    def fit(self, parameters: Parameters, config: dict) -> FitResult:
        self.memory[:] = parameters.flat()
        self.memory += self.delta  # "training", in place
        return FitResult(Parameters.from_flat(self.memory, self.specs, copy=False), 4, {})

    def evaluate(self, parameters: Parameters, config: dict) -> EvalResult:
        return EvalResult(0.0, 0, {})


# -- update attacks ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("attack", "expected"),
    [
        (SignFlip(), [[-4.0, 2.0], [13.0, 1.5]]),  # global - 10 * delta
        (sign_flip(2.0), [[0.0, 2.0], [5.0, 3.5]]),  # global - 2 * delta
        (Scaling(), [[6.0, 2.0], [-7.0, 6.5]]),  # global + 10 * delta
        (scaling(2.0), [[2.0, 2.0], [1.0, 4.5]]),  # global + 2 * delta
    ],
)
def test_update_attacks_hand_computed(attack, expected) -> None:
    result = MaliciousClient(FixedClient(), attack).fit(tiny_global(), {"seed": 3})
    w, count = result.parameters.arrays
    np.testing.assert_array_equal(w, np.array(expected, dtype=np.float32))
    assert w.dtype == np.float32
    assert count.dtype == np.int64 and int(count) == 6  # the inner client's value, not attacked
    assert result.parameters.specs == tiny_global().specs
    assert result.num_examples == 7
    assert result.metrics == {"train_loss": 0.5, "malicious": 1.0}


def test_attack_callables_on_delta() -> None:
    delta = np.array([0.5, 0.0, -1.0, 0.25], dtype=np.float32)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(SignFlip(10.0)(delta, rng), [-5.0, 0.0, 10.0, -2.5])
    np.testing.assert_array_equal(Scaling(4.0)(delta, rng), [2.0, 0.0, -4.0, 1.0])
    noise = GaussianNoise(2.0)(delta, np.random.default_rng(1))
    np.testing.assert_array_equal(noise, np.random.default_rng(1).normal(0.0, 2.0, 4).astype(np.float32))
    assert noise.dtype == np.float32 and noise.shape == delta.shape


def test_gaussian_replaces_delta_with_seeded_noise() -> None:
    client = MaliciousClient(FixedClient(), gaussian_noise(0.5))
    first = client.fit(tiny_global(), {"seed": 11})
    again = client.fit(tiny_global(), {"seed": 11})
    other = client.fit(tiny_global(), {"seed": 12})
    expected = GLOBAL_W.reshape(-1) + np.random.default_rng(11).normal(0.0, 0.5, 4).astype(np.float32)
    np.testing.assert_array_equal(first.parameters.arrays[0].reshape(-1), expected)
    assert first.parameters == again.parameters
    assert not np.array_equal(first.parameters.arrays[0], other.parameters.arrays[0])
    assert int(first.parameters.arrays[1]) == 6


def test_malicious_client_refuses_array_seed() -> None:
    with pytest.raises(TypeError, match="config 'seed' must be an integer"):
        MaliciousClient(FixedClient(), gaussian_noise(0.5)).fit(tiny_global(), {"seed": tiny_global()})


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_attack_strength_validated(bad) -> None:
    for make in (SignFlip, Scaling, GaussianNoise):
        with pytest.raises(ValueError, match="> 0"):
            make(bad)


def test_malicious_client_never_writes_shared_memory() -> None:
    specs = (ParamSpec("a", (2,), np.dtype(np.float32)), ParamSpec("b", (3,), np.dtype(np.float32)))
    memory = np.array([1.0, 2.0, 3.0, 4.0, 5.0], dtype=np.float32)
    delta = np.array([0.5, -0.25, 0.0, 1.0, -2.0], dtype=np.float32)
    global_values = memory.copy()
    # the global parameters themselves view the buffer the inner client trains in
    sent = Parameters.from_flat(memory, specs, copy=False)
    result = MaliciousClient(SharedMemoryClient(memory, specs, delta), SignFlip(10.0)).fit(sent, {"seed": 0})
    np.testing.assert_array_equal(memory, global_values + delta)  # only the honest training wrote it
    np.testing.assert_array_equal(result.parameters.flat(), global_values - 10 * delta)
    assert not np.shares_memory(result.parameters.flat(), memory)
    assert result.parameters.specs == specs and result.num_examples == 4
    assert result.metrics == {"malicious": 1.0}


def test_malicious_client_with_shared_torch_client() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    assert flatten_module_(model)
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)), 3, "toy")
    honest = TorchClient(model, data, settings=TrainSettings(lr=0.1, batch_size=4), share_result=True)
    start = Parameters.from_module(model)
    config = {"seed": 5}
    honest_result = honest.fit(start, config).parameters
    honest_flat = honest_result.flat().copy()
    malicious = MaliciousClient(honest, SignFlip(10.0)).fit(start, config)
    expected = start.flat() - 10 * (honest_flat - start.flat())
    np.testing.assert_allclose(malicious.parameters.flat(), expected, rtol=0, atol=1e-5)
    honest.fit(start, {"seed": 6})  # reloading the shared model must not disturb the attacked result
    np.testing.assert_allclose(malicious.parameters.flat(), expected, rtol=0, atol=1e-5)


def test_malicious_client_evaluate_delegates() -> None:
    inner = FixedClient()
    result = MaliciousClient(inner, Scaling()).evaluate(tiny_global(), {})
    assert inner.evaluated == 1 and result.metrics == {"accuracy": 0.75}


# -- names and selection ---------------------------------------------------------------------------
def test_choose_malicious_deterministic_and_sized() -> None:
    first = choose_malicious(20, 0.25, seed=4)
    assert first == choose_malicious(20, 0.25, seed=4)
    assert len(first) == 5 and len(set(first)) == 5
    assert all(c in {str(i) for i in range(20)} for c in first)
    assert [int(c) for c in first] == sorted(int(c) for c in first)
    assert choose_malicious(10, 0.0, seed=0) == []
    assert len(choose_malicious(10, 0.33, seed=0)) == 3
    assert len({tuple(choose_malicious(20, 0.25, seed=s)) for s in range(10)}) > 1


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_choose_malicious_rejects_fraction(fraction) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        choose_malicious(10, fraction, seed=0)


def test_validate_attack() -> None:
    for name in ATTACK_NAMES:
        validate_attack(name, 0.2)
    with pytest.raises(ValueError, match="sign_flip, scaling, gaussian, label_flip, backdoor"):
        validate_attack("trojan", 0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        validate_attack("scaling", 1.0)


def test_make_update_attack() -> None:
    assert make_update_attack("sign_flip", scale=3.0) == SignFlip(3.0)
    assert make_update_attack("scaling") == Scaling(10.0)
    assert make_update_attack("gaussian", std=0.1) == GaussianNoise(0.1)
    for name in ("label_flip", "backdoor"):
        with pytest.raises(ValueError, match="data attack"):
            make_update_attack(name)
    with pytest.raises(ValueError, match="sign_flip, scaling, gaussian"):
        make_update_attack("nope")
    with pytest.raises(ValueError, match="no attack"):
        make_update_attack("none")


# -- data attacks --------------------------------------------------------------------------------
def test_flip_labels_exact() -> None:
    data = TensorDataset(torch.zeros(5, 2), torch.tensor([0, 1, 2, 3, 9]), 10, "toy")
    flipped = flip_labels(data)
    assert flipped.y.tolist() == [9, 8, 7, 6, 0]
    assert data.y.tolist() == [0, 1, 2, 3, 9]  # original untouched
    assert flipped.x is not data.x and torch.equal(flipped.x, data.x)
    assert flip_labels(data, num_classes=12).y.tolist() == [11, 10, 9, 8, 2]
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        flip_labels(data, num_classes=5)


def test_trigger_on_image_batch() -> None:
    x = torch.zeros(3, 1, 28, 28)
    x[:, 0, 0, 0] = 2.5  # the data's max
    out = Trigger().apply(x)
    assert torch.all(out[:, :, 24:, 24:] == 2.5)
    expected = x.clone()
    expected[:, :, 24:, 24:] = 2.5
    assert torch.equal(out, expected)
    assert float(x[:, :, 24:, 24:].abs().sum()) == 0.0  # input untouched
    assert torch.equal(Trigger(size=2, value=-1.0).apply(x)[:, :, 26:, 26:], torch.full((3, 1, 2, 2), -1.0))


@pytest.mark.parametrize("side", [8, 28])
def test_trigger_on_flat_square_images(side) -> None:
    x = torch.rand(4, side * side) * 0.5
    x[0, 0] = 1.0
    out = Trigger(size=3).apply(x)
    assert out.shape == x.shape
    images = out.view(4, side, side)
    assert torch.all(images[:, side - 3 :, side - 3 :] == 1.0)
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[side - 3 :, side - 3 :] = True
    assert torch.equal(images[:, ~mask], x.view(4, side, side)[:, ~mask])


def test_trigger_refuses_tabular_and_oversized() -> None:
    with pytest.raises(ValueError, match="needs image data"):
        Trigger().apply(torch.zeros(5, 30))
    with pytest.raises(ValueError, match="needs image data"):
        poison_with_backdoor(TensorDataset(torch.zeros(5, 30), torch.zeros(5, dtype=torch.int64), 2, "t"), Trigger(), 1)
    with pytest.raises(ValueError, match="does not fit"):
        Trigger(size=9).apply(torch.zeros(2, 64))
    with pytest.raises(ValueError, match="size"):
        Trigger(size=0)


def test_poison_with_backdoor_fraction_and_labels() -> None:
    x = torch.rand(10, 64) * 0.5
    x[0, 0] = 1.0
    y = torch.arange(10) % 3
    data = TensorDataset(x, y, 3, "toy")
    poisoned = poison_with_backdoor(data, Trigger(size=2), target=2, fraction=0.5, seed=7)
    rows = np.sort(np.random.default_rng(7).choice(10, size=5, replace=False))
    clean = np.setdiff1d(np.arange(10), rows)
    assert poisoned.y[rows].tolist() == [2] * 5
    assert torch.equal(poisoned.y[clean], y[clean]) and torch.equal(poisoned.x[clean], x[clean])
    assert torch.equal(poisoned.x[rows], Trigger(size=2, value=1.0).apply(x[rows]))
    assert torch.equal(data.y, torch.arange(10) % 3) and float(data.x.max()) == 1.0  # original untouched
    assert poison_with_backdoor(data, Trigger(), 1, fraction=0.5, seed=7).y[rows].tolist() == [1] * 5
    changed = (poison_with_backdoor(data, Trigger(), 0, fraction=0.3, seed=1).x != x).any(1)
    assert int(changed.sum()) == 3
    with pytest.raises(ValueError, match="target"):
        poison_with_backdoor(data, Trigger(), target=3)


def test_triggered_test_set() -> None:
    x = torch.rand(6, 64) * 0.5
    x[1, 0] = 1.0
    test = TensorDataset(x, torch.tensor([0, 1, 2, 1, 0, 2]), 3, "toy")
    triggered = triggered_test_set(test, Trigger(), target=1)
    assert len(triggered) == 4 and triggered.y.tolist() == [1, 1, 1, 1]
    # the value is the max of the whole test set, even though row 1 (the max) is dropped
    assert torch.equal(triggered.x, Trigger(value=1.0).apply(x[[0, 2, 4, 5]]))


class CornerDetector(nn.Module):
    """Predicts ``target`` exactly when the bottom-right pixel is bright, else ``target + 1``."""

    def __init__(self, target: int, num_classes: int) -> None:
        super().__init__()
        self.target, self.num_classes = target, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = x.reshape(len(x), -1)[:, -1] > 0.9
        label = torch.where(bright, self.target, (self.target + 1) % self.num_classes)
        return nn.functional.one_hot(label, self.num_classes).float()


class NeverTarget(nn.Module):
    """Always predicts ``target + 1``."""

    def __init__(self, target: int, num_classes: int) -> None:
        super().__init__()
        self.target, self.num_classes = target, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = torch.full((len(x),), (self.target + 1) % self.num_classes)
        return nn.functional.one_hot(label, self.num_classes).float()


def test_attack_success_rate() -> None:
    x = torch.rand(50, 64) * 0.5
    x[0, 0] = 1.0
    test = TensorDataset(x, torch.arange(50) % 10, 10, "toy")
    assert attack_success_rate(CornerDetector(3, 10), test, Trigger(), target=3, batch_size=7) == 1.0
    assert attack_success_rate(NeverTarget(3, 10), test, Trigger(), target=3) == 0.0
    images = TensorDataset(x.view(50, 1, 8, 8), test.y, 10, "toy")
    assert attack_success_rate(CornerDetector(3, 10), images, Trigger(), target=3) == 1.0
