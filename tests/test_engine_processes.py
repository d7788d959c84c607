"""The multi-process engine: same bits as in-process, lost workers, client errors, shared memory, the CLI."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_harness import BIN, ENV

from insitu.algorithms.scaffold import SCAFFOLD_STATE
from insitu.client.api import Client, Config, EvalResult, FitResult
from insitu.engines.base import Outcome, Task, run_tasks
from insitu.engines.inprocess import InProcessPool
from insitu.engines.parallel import Job, ParallelPool
from insitu.engines.processes import ClientError, ProcessRunner, process_pool
from insitu.params import Parameters
from insitu.simulation import Experiment, SimulationConfig, build_experiment

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the processes engine forks its workers")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Bit-identical results need equal torch thread counts on both sides (workers use 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _shm_files() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"insitu-{os.getpid()}-")}


def _gone(pid: int) -> bool:
    """True once the process is reaped (a zombie still answers signal 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _run_both(**settings: object) -> tuple[Experiment, Experiment, object, object]:
    common = {"dataset": "digits", "num_clients": 6, "rounds": 3, "seed": 3, **settings}
    inprocess = build_experiment(SimulationConfig(**common))  # type: ignore[arg-type]
    expected = inprocess.run()
    processes = build_experiment(SimulationConfig(**common, engine="processes", workers=2))  # type: ignore[arg-type]
    got = processes.run()
    return inprocess, processes, expected, got


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_same_seed_same_bits_as_in_process(strategy):
    _, _, expected, got = _run_both(strategy=strategy, fraction_fit=0.5, fraction_evaluate=0.5)
    assert got.parameters == expected.parameters  # exact: same updates folded in the same order
    assert [r.selected for r in got.history.rounds] == [r.selected for r in expected.history.rounds]
    assert [r.fit_metrics for r in got.history.rounds] == [r.fit_metrics for r in expected.history.rounds]
    assert [r.federated for r in got.history.rounds] == [r.federated for r in expected.history.rounds]
    assert all(r.status == "ok" and not r.failures for r in got.history.rounds)


def test_scaffold_client_state_follows_the_client_across_workers():
    inprocess, processes, _, _ = _run_both(strategy="scaffold")
    assert processes.client_states is not None and inprocess.client_states is not None
    assert len(processes.client_states) == 6  # every client's c_i came home to the main process
    for cid in map(str, range(6)):
        mine = processes.client_states.for_client(cid).load(SCAFFOLD_STATE)
        theirs = inprocess.client_states.for_client(cid).load(SCAFFOLD_STATE)
        assert mine is not None and theirs is not None and np.array_equal(mine, theirs)


def test_fedbuff_under_a_systems_model_same_bits():
    _, _, expected, got = _run_both(mode="fedbuff", buffer_size=2, concurrency=4, speed_sigma=0.8, latency=0.1,
                                    rounds=4)
    assert got.parameters == expected.parameters
    assert [r.selected for r in got.history.rounds] == [r.selected for r in expected.history.rounds]


class _Dies:
    """Client 3 dies in round 2: its process is SIGKILLed (processes engine) or it raises (in-process)."""

    def __init__(self, inner: Client, kill: bool) -> None:
        self.inner, self.kill = inner, kill

    def fit(self, parameters: Parameters, config: Config) -> FitResult:
        if config.get("round") == 2:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("died")
        return self.inner.fit(parameters, config)

    def evaluate(self, parameters: Parameters, config: Config) -> EvalResult:
        return self.inner.evaluate(parameters, config)


def _with_client_3(experiment: Experiment, wrap) -> object:
    inner = experiment.client_fn
    return lambda cid: wrap(inner(cid)) if cid == "3" else inner(cid)


def test_a_killed_worker_fails_its_task_and_the_round_completes():
    config = {"dataset": "digits", "num_clients": 4, "rounds": 3, "seed": 1}
    reference = build_experiment(SimulationConfig(**config))  # type: ignore[arg-type]
    expected = reference.run(engine=InProcessPool(_with_client_3(reference, lambda c: _Dies(c, kill=False)), 4))
    experiment = build_experiment(SimulationConfig(**config))  # type: ignore[arg-type]
    pool = process_pool(_with_client_3(experiment, lambda c: _Dies(c, kill=True)), 4, 2)
    before = set(pool.runner.worker_pids())  # type: ignore[attr-defined]
    got = experiment.run(engine=pool)
    second = got.history.rounds[1]
    assert second.status == "ok" and second.num_results == 3
    assert [f["client"] for f in second.failures] == ["3"] and "WorkerLost" in second.failures[0]["reason"]
    assert got.history.rounds[2].num_results == 4  # a fresh worker took the dead one's place
    assert len(before) == 2
    # the lost update is left out exactly as a failed client's is in-process: same bits
    assert got.parameters == expected.parameters


class _Constant:
    """Returns the parameters it got; client "kill" SIGKILLs its own process instead."""

    def __init__(self, cid: str) -> None:
        self.cid = cid

    def fit(self, parameters: Parameters, config: Config) -> FitResult:
        if self.cid == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return FitResult(parameters, int(self.cid))

    def evaluate(self, parameters: Parameters, config: Config) -> EvalResult:
        raise NotImplementedError


def test_jobs_queued_behind_a_killed_job_run_on_the_replacement_worker():
    params = Parameters.from_arrays({"w": np.arange(4, dtype=np.float32)})
    runner = ProcessRunner(_Constant, 1)
    try:
        first = runner.worker_pids()
        for task_id, cid in enumerate(["kill", "5", "6"]):
            runner.start(Job(task_id, cid, "fit", {}, 0, params))
        outcomes: dict[int, Outcome] = {}
        while len(outcomes) < 3:
            outcomes.update(runner.finished())
        assert type(outcomes[0]).__name__ == "WorkerLost" and "client kill's fit task" in str(outcomes[0])
        assert [outcomes[i].num_examples for i in (1, 2)] == [5, 6]  # type: ignore[union-attr]
        assert outcomes[1].parameters == params  # type: ignore[union-attr]
        assert runner.slots == 1 and runner.worker_pids() != first and _gone(first[0])
    finally:
        runner.close()
    assert _shm_files() == set()


class _Raises:
    def fit(self, parameters: Parameters, config: Config) -> FitResult:
        raise ValueError("no data today")

    def evaluate(self, parameters: Parameters, config: Config) -> EvalResult:
        raise KeyError("nothing")


def test_a_client_exception_is_a_failed_task_not_a_crash():
    experiment = build_experiment(SimulationConfig(dataset="digits", num_clients=3, rounds=2))
    pool = process_pool(lambda cid: _Raises() if cid == "1" else experiment.client_fn(cid), 3, 2)
    got = experiment.run(engine=pool)
    for record in got.history.rounds:
        assert record.status == "ok" and record.num_results == 2
        assert record.failures[0]["client"] == "1"
        assert "ClientError: ValueError: no data today" in record.failures[0]["reason"]


def test_shared_memory_is_freed_and_workers_reaped_on_close():
    experiment = build_experiment(SimulationConfig(dataset="digits", num_clients=3, rounds=1))
    runner = ProcessRunner(experiment.client_fn, 2)
    pool = ParallelPool(runner, 3)
    pids = runner.worker_pids()
    tasks = [Task(str(i), {"round": 1}) for i in range(3)]
    outcomes = dict(run_tasks(pool, "fit", experiment.initial_parameters, 0, tasks))
    assert all(isinstance(o, FitResult) for o in outcomes.values())
    assert outcomes["0"].num_examples == len(experiment.train_parts[0])  # type: ignore[union-attr]
    names = runner.shared_memory_names()
    assert len(names) == 1 and _shm_files() == set(names)  # one block for the one model version
    pool.close()
    assert _shm_files() == set()
    assert all(_gone(pid) for pid in pids)


def test_garbage_collection_stops_the_workers_and_frees_the_memory():
    experiment = build_experiment(SimulationConfig(dataset="digits", num_clients=2, rounds=1))
    torch.set_num_threads(2)
    runner = ProcessRunner(experiment.client_fn, 1)
    assert torch.get_num_threads() == 1  # the main process folds on one thread while workers run
    pids = runner.worker_pids()
    runner.start(Job(0, "0", "fit", {"round": 1}, 0, experiment.initial_parameters))
    assert isinstance(runner.finished()[0][1], FitResult)
    assert _shm_files()
    del runner
    gc.collect()
    assert _shm_files() == set()
    assert all(_gone(pid) for pid in pids)
    assert torch.get_num_threads() == 2


def test_non_float32_parameters_travel_as_bytes():
    params = Parameters.from_arrays({"w": np.arange(3, dtype=np.float32), "n": np.array([7], dtype=np.int64)})

    class Echo:
        def fit(self, parameters: Parameters, config: Config) -> FitResult:
            extra = Parameters.from_arrays({"c": np.full(2, float(config["x"]), dtype=np.float32)})
            seen = dict(config["p"])["w"].sum()  # type: ignore[call-overload]
            return FitResult(parameters, 5, {"seen": seen, "n": np.int64(3)}, {"delta": extra})

        def evaluate(self, parameters: Parameters, config: Config) -> EvalResult:
            return EvalResult(float(dict(parameters)["n"][0]), 2, {"acc": 0.5})

    runner = ProcessRunner(lambda cid: Echo(), 1)
    try:
        runner.start(Job(0, "0", "fit", {"x": 1.5, "p": params}, 0, params))
        (task_id, fit), = runner.finished()
        assert task_id == 0 and isinstance(fit, FitResult)
        assert fit.parameters == params and fit.num_examples == 5
        assert fit.metrics == {"seen": 3.0, "n": 3} and type(fit.metrics["n"]) is int
        assert np.array_equal(fit.extras["delta"].flat(), [1.5, 1.5])
        assert runner.shared_memory_names() == []  # an int64 array: no shared block
        runner.start(Job(1, "0", "evaluate", {}, 0, params))
        (task_id, evaluation), = runner.finished()
        assert evaluation == EvalResult(7.0, 2, {"acc": 0.5})
    finally:
        runner.close()


class _OutOfOrder:
    """A fake runner: finishes the started jobs newest first, and records how far ahead it was asked to run."""

    slots = 2

    def __init__(self) -> None:
        self.started: list[int] = []
        self.unreported: list[Job] = []
        self.most_unreported = 0

    def start(self, job: Job) -> None:
        self.started.append(job.task_id)
        self.unreported.append(job)
        self.most_unreported = max(self.most_unreported, len(self.unreported))

    def finished(self) -> list[tuple[int, Outcome]]:
        done, self.unreported = self.unreported[::-1], []
        return [(job.task_id, FitResult(job.parameters, 10 + job.task_id)) for job in done]

    def close(self) -> None:
        pass


def test_parallel_pool_yields_in_submission_order_within_its_window():
    runner = _OutOfOrder()
    pool = ParallelPool(runner, 10, window=3)
    params = Parameters.from_arrays({"w": np.zeros(2, dtype=np.float32)})
    ids = pool.submit("fit", params, 0, [Task(str(i), {}) for i in range(7)])
    seen = []
    for result in pool.results():
        seen.append((result.task_id, result.client_id, result.outcome.num_examples))  # type: ignore[union-attr]
        assert len(runner.started) - len(seen) <= 3  # never more than the window ahead of the consumer
    assert seen == [(i, str(i), 10 + i) for i in ids]
    assert sorted(runner.started) == ids and runner.most_unreported <= 3


def test_the_cli_runs_on_worker_processes(tmp_path: Path):
    out = tmp_path / "run"
    proc = subprocess.run([str(BIN / "insitu"), "simulate", "--engine", "processes", "--workers", "2", "--dataset",
                           "digits", "--clients", "4", "--rounds", "2", "-o", str(out)], capture_output=True,
                          text=True, env=ENV, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    history = json.loads((out / "history.json").read_text())
    assert len(history["rounds"]) == 2 and all(not r.get("failures") for r in history["rounds"])
    assert history["rounds"][-1]["centralized"]["metrics"]["accuracy"] > 0.5
    settings = json.loads((out / "config.json").read_text())
    assert json.dumps(settings).count('"processes"') == 1


def test_unknown_engine_and_accelerator_with_processes_are_refused():
    with pytest.raises(ValueError, match="engine"):
        build_experiment(SimulationConfig(dataset="digits", engine="threads"))
    with pytest.raises(ValueError, match="forks CPU worker processes"):
        SimulationConfig(dataset="digits", engine="processes", device="cuda").validate()


def test_client_error_carries_type_and_message():
    error = ClientError("ValueError", "bad")
    assert isinstance(error, RuntimeError) and str(error) == "ValueError: bad" and error.type_name == "ValueError"
