"""Batched cohorts (insitu.client.batched, insitu.engines.cohort): K clients' local SGD as one vmap
computation must be the math of K separate TorchClient loops, fall back (saying why) where it cannot
be, and run end to end from the CLI.

Tolerance: the batched run is not bit-identical to the loops. Its matrix products are batched
(bmm), which reduce in another order than K separate matmuls, and each step's mean loss is a
weighted sum (rows x 1/count) instead of a sum divided by count; both are float32 rounding
(differences ~1e-8 per weight here). We compare with atol 1e-5 on the parameters (a wrong batch, a
missed mask or a wrong mean moves them by >1e-3 at these learning rates) and rtol 1e-5 on the
reported training loss.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from insitu.client.batched import Member, cohort_obstacle, train_cohort
from insitu.client.torch_client import ShuffledSGD, TorchClient, TrainSettings
from insitu.data import TensorDataset
from insitu.engines.base import Task
from insitu.engines.cohort import BatchedPool
from insitu.engines.inprocess import InProcessPool
from insitu.models import build_model
from insitu.params import Parameters, flatten_module_
from insitu.run.loop import RunResult
from insitu.simulation import SimulationConfig, build_experiment, resolve_device, run_simulation

ATOL = 1e-5
INSITU = shutil.which("insitu") or str(Path(sys.executable).parent / "insitu")


def _data(n: int = 200, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), 10, "rand")


def _model(name: str) -> nn.Module:
    torch.manual_seed(1)
    model = build_model(name, (1, 28, 28), 10)
    flatten_module_(model)
    return model


# unequal client sizes: 70 rows is 3 batches of 32 with a short last one (6 rows); 33 is one row past a batch
PARTS = [torch.arange(0, 70), torch.arange(70, 130), torch.arange(130, 163), torch.arange(163, 200)]


def _compare(model: nn.Module, clients: list[TorchClient], configs: list[dict]) -> None:
    sent = Parameters.from_module(model)
    loops = [c.fit(sent, cfg) for c, cfg in zip(clients, configs)]
    loops = [type(r)(Parameters.from_flat(r.parameters.flat(), r.parameters.specs), r.num_examples, r.metrics)
             for r in loops]  # own copies: the shared model is reloaded below
    batched = train_cohort(sent, [Member(c, cfg) for c, cfg in zip(clients, configs)])
    assert len(batched) == len(loops)
    for loop, cohort in zip(loops, batched):
        assert cohort.num_examples == loop.num_examples
        assert cohort.extras == {} and set(cohort.metrics) == {"train_loss"}
        assert cohort.metrics["train_loss"] == pytest.approx(loop.metrics["train_loss"], rel=1e-5)
        assert np.abs(loop.parameters.flat() - sent.flat()).max() > 1e-3  # training moved the model
        np.testing.assert_allclose(cohort.parameters.flat(), loop.parameters.flat(), rtol=0, atol=ATOL)
        assert cohort.parameters.specs == sent.specs


@pytest.mark.parametrize("name", ["2nn", "simple-cnn"])
def test_cohort_equals_separate_loops_with_unequal_client_sizes(name):
    model, data = _model(name), _data()
    settings = TrainSettings(local_epochs=2, batch_size=32, lr=0.05)
    clients = [TorchClient(model, data, train_indices=p, settings=settings) for p in PARTS]
    _compare(model, clients, [{"seed": 11 + i} for i in range(len(PARTS))])


def test_cohort_equals_loops_with_momentum_weight_decay_and_per_client_settings():
    """Per-task overrides differ by client: epochs (a straggler's 1 of 3), batch size (0 = full batch),
    lr and momentum; the clients that finish early must take no masked step."""
    model, data = _model("2nn"), _data()
    settings = TrainSettings(local_epochs=3, batch_size=16, lr=0.03, momentum=0.9, weight_decay=1e-3)
    clients = [TorchClient(model, data, train_indices=p, settings=settings) for p in PARTS]
    configs = [{"seed": 5}, {"seed": 6, "local_epochs": 1}, {"seed": 7, "batch_size": 0, "lr": 0.1},
               {"seed": 8, "momentum": 0.0, "batch_size": 50}]
    _compare(model, clients, configs)


def test_cohort_equals_loops_on_all_rows_and_the_default_seed():
    """Clients without an index (the whole dataset) and without a seed in the config (their own seed)."""
    model, data = _model("2nn"), _data(100)
    clients = [TorchClient(model, data, settings=TrainSettings(batch_size=24, lr=0.1), seed=s) for s in (0, 1, 2)]
    _compare(model, clients, [{}, {}, {}])


class _Plugin(ShuffledSGD):
    pass


class _Noisy(nn.Module):
    """Randomness in forward without a Dropout module: only running it under vmap finds it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1) + 0.01 * torch.randn_like(x.flatten(1)))


FALLBACKS = ["dropout", "buffers", "float64", "frozen", "adam", "fedprox", "scaffold", "plugin", "subclass", "loss_fn",
             "no_steps"]


def _fallback_client(case: str) -> tuple[TorchClient, dict, str]:
    data = _data(64)
    model: nn.Module = build_model("2nn", (1, 28, 28), 10)
    kwargs: dict = {}
    config: dict = {"seed": 1}
    cls: type[TorchClient] = TorchClient
    if case == "dropout":
        model, expect = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Dropout(0.5)), "dropout"
    elif case == "buffers":
        model, expect = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.BatchNorm1d(10)), "buffers"
    elif case == "float64":
        model, expect = model.double(), "not float32"
    elif case == "frozen":
        model.fc1.weight.requires_grad_(False)
        expect = "frozen"
    elif case == "adam":
        config["optimizer"], expect = "adam", "optimizer 'adam'"
    elif case in ("fedprox", "scaffold"):
        config["algorithm"], expect = case, f"client algorithm {case!r} is not plain local SGD"
    elif case == "plugin":
        kwargs["loop_plugin"], expect = _Plugin(), "custom loop plug-in (_Plugin)"
    elif case == "subclass":
        cls, expect = type("DPLikeClient", (TorchClient,), {}), "DPLikeClient, not a plain TorchClient"
    elif case == "loss_fn":
        kwargs["loss_fn"], expect = nn.CrossEntropyLoss(reduction="sum"), "own loss_fn"
    else:
        config["local_epochs"], expect = 0, "no local step"
    return cls(model, data, **kwargs), config, expect


@pytest.mark.parametrize("case", FALLBACKS)
def test_each_obstacle_is_named(case):
    client, config, expect = _fallback_client(case)
    reason = cohort_obstacle(client, config)
    assert reason is not None and expect in reason


def test_a_plain_client_has_no_obstacle():
    assert cohort_obstacle(TorchClient(_model("2nn"), _data(10)), {"seed": 0, "algorithm": "local_sgd"}) is None


def _fits(pool: InProcessPool, parameters: Parameters, ids: list[str], configs: list[dict]) -> list:
    pool.submit("fit", parameters, 0, [Task(cid, cfg) for cid, cfg in zip(ids, configs)])
    out = []
    for result in pool.results():
        outcome = result.outcome
        assert not isinstance(outcome, BaseException), outcome
        out.append((result.client_id, Parameters.from_flat(outcome.parameters.flat(), outcome.parameters.specs),
                    outcome.num_examples, outcome.metrics))
    return out


def test_engine_falls_back_when_forward_draws_randomness(caplog):
    """A model whose forward calls torch.randn passes the static checks; vmap refuses it at run time, and the
    engine runs the cohort client by client (same results as the in-process engine) and logs why."""
    torch.manual_seed(0)
    model, data = _Noisy(), _data(100)
    client_fn = lambda cid: TorchClient(model, data, train_indices=PARTS[int(cid)][PARTS[int(cid)] < 100],
                                        settings=TrainSettings(batch_size=10))
    sent = Parameters.from_module(model)
    configs = [{"seed": 3}, {"seed": 4}]
    with caplog.at_level(logging.INFO, logger="insitu"):
        pool = BatchedPool(client_fn, 2)
        torch.manual_seed(9)
        batched = _fits(pool, sent, ["0", "1"], configs)
    torch.manual_seed(9)
    plain = _fits(InProcessPool(client_fn, 2), sent, ["0", "1"], configs)
    assert pool.cohorts.batched == 0 and pool.cohorts.sequential == 2
    assert "batched training failed" in caplog.text and "trains on its own" in caplog.text
    for (cid_a, p_a, n_a, m_a), (cid_b, p_b, n_b, m_b) in zip(batched, plain):
        assert (cid_a, n_a, m_a) == (cid_b, n_b, m_b) and p_a == p_b  # the very same loop ran


def test_engine_mixes_cohort_and_fallback_clients_in_submission_order():
    """Clients 1 and 3 run FedProx (their own loop), 0, 2 and 4 are one cohort; results keep the order."""
    model, data = _model("2nn"), _data()
    parts = [torch.arange(i * 40, (i + 1) * 40) for i in range(5)]
    client_fn = lambda cid: TorchClient(model, data, train_indices=parts[int(cid)],
                                        settings=TrainSettings(batch_size=32, lr=0.05))
    sent = Parameters.from_module(model)
    configs = [{"seed": i} if i % 2 == 0 else {"seed": i, "algorithm": "fedprox", "proximal_mu": 0.1}
               for i in range(5)]
    ids = [str(i) for i in range(5)]
    pool = BatchedPool(client_fn, 5)
    batched = _fits(pool, sent, ids, configs)
    plain = _fits(InProcessPool(client_fn, 5), sent, ids, configs)
    assert (pool.cohorts.batched, pool.cohorts.sequential) == (3, 2)
    assert [b[0] for b in batched] == ids
    for (cid, p_a, n_a, m_a), (_, p_b, n_b, m_b) in zip(batched, plain):
        assert n_a == n_b and m_a["train_loss"] == pytest.approx(m_b["train_loss"], rel=1e-5)
        np.testing.assert_allclose(p_a.flat(), p_b.flat(), rtol=0, atol=ATOL)
        if int(cid) % 2:
            assert p_a == p_b  # fell back: bit-identical


SIM = {"dataset": "digits", "model": "mlp", "num_clients": 6, "rounds": 2, "local_epochs": 2, "lr": 0.1,
       "fraction_fit": 1.0, "batch_size": 16, "seed": 2}


_PLAIN_RUNS: dict[str, tuple[Parameters, RunResult]] = {}


def _plain_run(extra: dict) -> tuple[Parameters, RunResult]:
    """The in-process loop's run of SIM + ``extra`` (once per module: the device test reuses it)."""
    key = json.dumps(extra, sort_keys=True)
    if key not in _PLAIN_RUNS:
        experiment, result = run_simulation(SimulationConfig(**{**SIM, **extra}))
        _PLAIN_RUNS[key] = Parameters.from_module(experiment.model), result
    return _PLAIN_RUNS[key]


@pytest.mark.parametrize("extra", [{"fraction_evaluate": 0.5}, {"straggler_fraction": 0.5, "speed_sigma": 0.5, "momentum": 0.5},
                                   {"mode": "fedbuff", "buffer_size": 2, "concurrency": 4, "rounds": 4}],
                         ids=["sync", "stragglers", "fedbuff"])
def test_simulation_with_cohort_batching_matches_the_loop(extra):
    """The whole path: sampling, the systems model's per-client epochs and order, validation and folding."""
    plain, a = _plain_run(extra)
    experiment, b = run_simulation(SimulationConfig(**{**SIM, **extra}, cohort_batching=True))
    batched = Parameters.from_module(experiment.model)
    np.testing.assert_allclose(batched.flat(), plain.flat(), rtol=0, atol=1e-4)  # 3-4 rounds of rounding
    assert len(a.history.rounds) == len(b.history.rounds)
    for ra, rb in zip(a.history.rounds, b.history.rounds):
        assert (ra.selected, ra.num_results, ra.failures) == (rb.selected, rb.num_results, rb.failures)
        assert ra.fit_metrics == pytest.approx(rb.fit_metrics, rel=1e-4)
        assert ra.clients.keys() == rb.clients.keys()
        for cid, metrics in ra.clients.items():
            assert metrics == pytest.approx(rb.clients[cid], rel=1e-4)


def test_simulation_falls_back_for_fedprox_and_says_why(caplog):
    """FedProx clients cannot be batched: the run logs why and is the plain loop's run, bit for bit."""
    config = {**SIM, "rounds": 1, "strategy": "fedprox", "mu": 0.1}
    plain, _ = run_simulation(SimulationConfig(**config))
    with caplog.at_level(logging.WARNING, logger="insitu"):
        batched, _ = run_simulation(SimulationConfig(**config, cohort_batching=True))
    assert "client algorithm 'fedprox' is not plain local SGD" in caplog.text
    assert Parameters.from_module(batched.model) == Parameters.from_module(plain.model)


def test_cohort_batching_refuses_other_engines():
    experiment = build_experiment(SimulationConfig(**SIM, cohort_batching=True, engine="processes"))
    with pytest.raises(ValueError, match="cohort_batching trains clients together in this process"):
        experiment.engine()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([INSITU, *args], check=False, capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={"COLUMNS": "200", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})


def test_cli_cohort_batching_end_to_end(tmp_path):
    """``insitu simulate --cohort-batching`` runs, records the setting, and ends where the loop ends (the
    run's own config.json, batching off, replayed in-process)."""
    out = tmp_path / "batched"
    proc = _cli("simulate", "--dataset", "digits", "--model", "mlp", "--clients", "5", "--rounds", "2", "--lr", "0.1",
                "--cohort-batching", "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = json.loads((out / "config.json").read_text())
    assert saved["cohort_batching"] is True
    batched = json.loads((out / "history.json").read_text())["rounds"][-1]["centralized"]
    _, plain = run_simulation(SimulationConfig.from_dict({**saved, "cohort_batching": False}))
    final = plain.history.rounds[-1].centralized
    assert final is not None and len(plain.history.rounds) == 2
    assert batched["loss"] == pytest.approx(final.loss, rel=1e-4)
    assert batched["metrics"]["accuracy"] == pytest.approx(final.metrics["accuracy"], abs=2e-3)


# -- devices ------------------------------------------------------------------------------------------

def test_device_cpu_through_the_whole_path_is_the_default_run():
    """device="cpu" named explicitly (training, federated and central evaluation) is the default run, bit for bit."""
    default, a = _plain_run({"fraction_evaluate": 0.5})
    explicit, b = run_simulation(SimulationConfig(**SIM, fraction_evaluate=0.5, device="cpu"))
    assert Parameters.from_module(explicit.model) == default
    assert explicit.train.x.device.type == "cpu" and next(explicit.model.parameters()).device.type == "cpu"
    assert [r.accuracy for r in a.history.rounds] == [r.accuracy for r in b.history.rounds]
    assert all(r.federated is not None for r in b.history.rounds)


@pytest.mark.parametrize("name, message", [
    ("cuda", "torch.cuda.is_available() is False"),
    ("cuda:0", "torch.cuda.is_available() is False"),
    ("tpu", "use cpu, cuda, cuda:N or mps"),
    ("meta", "unsupported device 'meta'"),
])
def test_unavailable_device_is_refused_naming_the_fix(name, message):
    if name.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_device(name)
    with pytest.raises(ValueError, match="device"):  # before any data is loaded
        build_experiment(SimulationConfig(**SIM, device=name))


def test_cli_unavailable_device_fails_before_training(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = _cli("simulate", "--dataset", "digits", "--device", "cuda", cwd=tmp_path)
    assert proc.returncode != 0
    assert "torch.cuda.is_available() is False" in proc.stdout + proc.stderr
    assert "Round 1" not in proc.stdout
