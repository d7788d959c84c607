"""The Ray engine on a real two-node Ray cluster started on this machine (`ray start` twice).

Skipped when Ray is not installed (pip install 'insitu[ray]'). One cluster serves the whole module:
starting it costs ~15 s, each engine (actors building the experiment) a few more.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_harness import BIN, ENV, free_port

from insitu.engines.base import Task
from insitu.engines.parallel import WorkerLost
from insitu.simulation import SimulationConfig, build_experiment

# Token authentication on, with this module's own token: hermetic whatever ~/.ray holds, and the cluster's
# ports answer no one else. The nodes, this process and the CLI's get it through the environment, set
# before ray is imported (its core reads it then).
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
# Loopback only: Ray would put its nodes (and this driver) on the machine's network address; the nodes start
# through insitu.engines.ray_loopback and every driver resolves itself to 127.0.0.1 (DRIVER_ENV).
AUTH.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
os.environ.update(AUTH)
RAY_ENV = {**ENV, **AUTH}

ray = pytest.importorskip("ray", reason="the Ray engine's tests need Ray: pip install 'insitu[ray]'")

from insitu.engines.ray_engine import RayRunner, make_ray_engine

CONFIG: dict = {"dataset": "digits", "num_clients": 6, "rounds": 2, "model": "2nn", "batch_size": 16, "lr": 0.05,
                "seed": 7}


def _ray_cli(*args: str) -> None:
    """``ray <args>`` with the node address pinned to 127.0.0.1."""
    subprocess.run([str(BIN / "python"), "-m", "insitu.engines.ray_loopback", *args], check=True, env=RAY_ENV,
                   capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head node and a worker node, 1 CPU each, on this machine; the test process is connected to it."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="ir", dir="/tmp")  # short: Ray's unix sockets live under it
    try:
        _ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
                 "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}")
        _ray_cli("start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                 "--disable-usage-stats")
        ray.init(address=address, log_to_driver=False)
        nodes = [node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]]
        assert nodes == ["127.0.0.1", "127.0.0.1"], f"the cluster left loopback: {nodes}"
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], check=False, env=RAY_ENV, capture_output=True,
                       timeout=120)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """In-process reference runs with one torch thread, as each actor does (same kernels, same bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_nodes_give_the_in_process_parameters(cluster: str, one_thread: None) -> None:
    reference = build_experiment(SimulationConfig(**CONFIG)).run().parameters
    experiment = build_experiment(SimulationConfig(**CONFIG, engine="ray"))
    engine = make_ray_engine(experiment, workers=2)
    runner = engine.runner
    assert isinstance(runner, RayRunner)
    nodes = runner.node_ids()
    result = experiment.run(engine=engine)
    assert len(set(nodes)) == 2, f"both actors landed on one node: {nodes}"
    assert all(count > 0 for count in runner.tasks_run), f"an actor (node) ran no task: {runner.tasks_run}"
    assert sum(runner.tasks_run) == CONFIG["num_clients"] * CONFIG["rounds"]
    assert result.parameters.names == reference.names
    for got, want in zip(result.parameters.arrays, reference.arrays, strict=True):
        np.testing.assert_array_equal(got, want)  # bit for bit
    assert not np.array_equal(reference.flat, experiment.initial_parameters.flat)  # it trained


def test_a_killed_actor_loses_its_task_and_the_round_goes_on(cluster: str) -> None:
    experiment = build_experiment(SimulationConfig(**CONFIG))
    engine = make_ray_engine(experiment, workers=2)
    runner = engine.runner
    assert isinstance(runner, RayRunner)
    runner.node_ids()  # both actors built
    victim = ray.get(runner.actors[0].pid.remote())
    tasks = [Task(str(i), {"round": 1}) for i in range(6)]
    params = experiment.initial_parameters
    try:
        engine.submit("fit", params, 1, tasks)
        outcomes = []
        for n, result in enumerate(engine.results()):
            outcomes.append(result.outcome)
            if n == 0:  # both actors hold a task now (window of 4): SIGKILL one mid-round
                os.kill(victim, signal.SIGKILL)
        lost = [o for o in outcomes if isinstance(o, WorkerLost)]
        assert len(outcomes) == 6
        assert 1 <= len(lost) <= 2, outcomes  # its running task, and one queued behind it at most
        assert all(hasattr(o, "parameters") for o in outcomes if not isinstance(o, WorkerLost)), outcomes
        # the next round runs on a fresh actor in the dead one's place: every task comes back
        engine.submit("fit", params, 2, [Task(str(i), {"round": 2}) for i in range(6)])
        again = [r.outcome for r in engine.results()]
        assert all(hasattr(o, "parameters") for o in again), again
        assert ray.get(runner.actors[0].pid.remote()) != victim
    finally:
        engine.close()


@pytest.mark.slow  # ~30 s more: a fresh process connects and builds its actors (run with -m slow)
def test_cli_simulate_on_the_cluster(cluster: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run([str(BIN / "insitu"), "simulate", "--engine", "ray", "--ray-address", cluster,
                          "--dataset", "digits", "--clients", "4", "--rounds", "2", "--model", "2nn",
                          "--seed", "3", "-o", str(out)],
                         check=False, env=RAY_ENV, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Done" in run.stdout
    assert (out / "history.json").exists() or any(out.iterdir())


def test_wire_format_round_trips_without_pickle() -> None:
    from insitu.client.api import EvalResult, FitResult
    from insitu.engines.ray_engine import (
        RemoteClientError,
        decode_config,
        decode_outcome,
        encode_config,
        encode_outcome,
    )
    from insitu.params import Parameters

    model = Parameters.from_arrays({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)})
    variate = Parameters.from_arrays({"c": np.full(4, -0.5, np.float32)})
    header, payloads = encode_config({"round": 3, "lr": 0.1, "algorithm": "scaffold", "control": variate})
    assert b"pickle" not in header and all(isinstance(p, bytes) for p in payloads)
    config = decode_config(header, payloads)
    assert config["round"] == 3 and config["lr"] == 0.1 and config["algorithm"] == "scaffold"
    assert config["control"] == variate

    fit = FitResult(model, 17, {"loss": 0.25}, {"delta": variate})
    back = decode_outcome(*encode_outcome(fit), expected=model)
    assert isinstance(back, FitResult) and back.parameters == model and back.extras["delta"] == variate
    assert (back.num_examples, back.metrics) == (17, {"loss": 0.25})
    other = Parameters.from_arrays({"w": np.zeros((3, 2), np.float32), "b": np.ones(3, np.float32)})
    with pytest.raises(ValueError):  # a fit whose arrays do not match the global model is refused
        decode_outcome(*encode_outcome(FitResult(other, 1)), expected=model)
    evaluation = decode_outcome(*encode_outcome(EvalResult(0.5, 9, {"accuracy": 0.75})))
    assert evaluation == EvalResult(0.5, 9, {"accuracy": 0.75})
    failure = decode_outcome(*encode_outcome(ZeroDivisionError("boom")))
    assert isinstance(failure, RemoteClientError) and str(failure) == "ZeroDivisionError: boom"
    # numpy numbers (what a client computes with) encode as JSON numbers, as they do in-process
    numpy_fit = decode_outcome(*encode_outcome(FitResult(model, np.int64(5), {"loss": np.float32(0.5)})),
                               expected=model)
    assert isinstance(numpy_fit, FitResult) and (numpy_fit.num_examples, numpy_fit.metrics) == (5, {"loss": 0.5})


def test_ray_with_an_accelerator_is_refused_when_configured() -> None:
    with pytest.raises(ValueError, match="engine 'ray' runs CPU actors"):
        SimulationConfig(**CONFIG, engine="ray", device="cuda").validate()


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from insitu.engines.ray_engine import RayRunner

    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ImportError, match=r"pip install 'insitu\[ray\]'"):
        RayRunner(SimulationConfig(**CONFIG))
