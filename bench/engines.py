"""Benchmark (not a test): steady-round time of each engine against the single-process PyTorch floor.

FedAvg on MNIST, 100 IID clients, 10 sampled per round, 1 local epoch, batch 32, for the 2NN and the
SimpleCNN. The floor runs exactly the same SGD steps (same clients, same shuffles, same batches) in one
hand-written loop in one process (``simulation_overhead.floor_round``), once with torch's default thread
count and once with 1 thread. Each engine runs the real simulation (``Experiment.run``) with
evaluation off; a round's time is the gap between two ``on_round`` calls, and round 1 (allocator,
kernels, the workers' first touch of the data) is left out. Every time is printed as a ratio to the
faster of the two floors measured in the same run, beside its CPU seconds (main process plus
workers): on a machine shared with other jobs the wall times move a lot, the CPU seconds much less.

Engines are a table (``ENGINES``): add one there. The Ray engine is in it but not run by default
(``--engines inprocess,processes,ray``, or bench/ray_engine.py on a two-node loopback cluster); its
CPU column counts the actors' processes on this machine.

Acceptance target (issue 13): the best engine <= 0.6 x the floor on a 2-core machine.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simulation_overhead import floor_round  # the same SGD steps as one federated round

from insitu.engines import InProcessPool
from insitu.engines.processes import process_pool
from insitu.simulation import Experiment, SimulationConfig, build_experiment

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
TARGET = 0.6


Timed = tuple[list[float], list[float], list[list[str]]]
"""Each round's wall seconds, its CPU seconds (main process and workers) and its sampled clients."""


def _cpu_seconds(pids: list[int]) -> float:
    """This process's CPU time plus that of the given (live) child processes, from /proc."""
    total = time.process_time()
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def timed_run(experiment: Experiment, engine_factory: Callable[[], Any]) -> Timed:
    """Run the experiment on a fresh engine, timing each round (the gap between two ``on_round`` calls)."""
    stamps: list[tuple[float, float]] = []
    selected: list[list[str]] = []
    engine = engine_factory()  # a process engine forks here, before the clock starts
    worker_pids = getattr(getattr(engine, "runner", None), "worker_pids", None)
    pids: list[int] = worker_pids() if worker_pids is not None else []

    def on_round(record: Any, _parameters: Any, _state: Any) -> None:
        stamps.append((time.perf_counter(), _cpu_seconds(pids)))
        selected.append(list(record.selected))

    stamps.append((time.perf_counter(), _cpu_seconds(pids)))
    experiment.run(on_round=on_round, engine=engine)
    wall = [b[0] - a[0] for a, b in itertools.pairwise(stamps)]
    cpu = [b[1] - a[1] for a, b in itertools.pairwise(stamps)]
    return wall, cpu, selected


def run_inprocess(experiment: Experiment, workers: int) -> Timed:
    return timed_run(experiment, lambda: InProcessPool(experiment.client_fn, experiment.config.num_clients))


def run_processes(experiment: Experiment, workers: int) -> Timed:
    return timed_run(experiment, lambda: process_pool(experiment.client_fn, experiment.config.num_clients, workers,
                                                      states=experiment.client_states))


def run_ray(experiment: Experiment, workers: int) -> Timed:
    """Ray actors: on the cluster this process is connected to (bench/ray_engine.py starts a two-node one),
    else on a local Ray instance."""
    from insitu.engines.ray_engine import make_ray_engine

    return timed_run(experiment, lambda: make_ray_engine(experiment, workers=workers))


# name -> (function, whether it takes --workers)
ENGINES: dict[str, tuple[Callable[[Experiment, int], Timed], bool]] = {
    "inprocess": (run_inprocess, False),
    "processes": (run_processes, True),
    "ray": (run_ray, True),
}


def floor_times(experiment: Experiment, selected: list[list[str]], seed: int, threads: int) -> tuple[list[float], list[float]]:
    """The floor's wall and CPU seconds per round over the same sampled clients, each from the initial model."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = experiment.model
        optimizer = torch.optim.SGD(model.parameters(), lr=experiment.config.lr)
        parts = [torch.as_tensor(p) for p in experiment.train_parts]
        wall, cpu = [], []
        for server_round, chosen in enumerate(selected, start=1):
            experiment.initial_parameters.to_module(model)
            started, started_cpu = time.perf_counter(), time.process_time()
            floor_round(experiment, optimizer, parts, server_round, chosen, seed)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        return wall, cpu
    finally:
        torch.set_num_threads(before)


def steady(times: list[float]) -> float:
    """Mean seconds per round, round 1 left out."""
    return statistics.fmean(times[1:]) if len(times) > 1 else times[0]


def bench_model(model: str, data_dir: str, rounds: int, seed: int, workers: int, engines: list[str]) -> float:
    config = SimulationConfig(dataset="mnist", data_dir=data_dir, model=model, num_clients=100, partition="iid",
                              fraction_fit=0.1, min_fit_clients=1, fraction_evaluate=0.0, rounds=rounds,
                              local_epochs=1, batch_size=32, lr=0.01, seed=seed)
    experiment = build_experiment(config)
    experiment.strategy.evaluate_fn = None  # the floor does not evaluate either
    rows: dict[str, tuple[float, float]] = {}  # label -> steady (wall, CPU) seconds per round
    selected: list[list[str]] = []
    for name in engines:
        function, uses_workers = ENGINES[name]
        label = f"{name} ({workers} workers)" if uses_workers else f"{name} ({torch.get_num_threads()} threads)"
        wall, cpu, selected = function(experiment, workers)
        rows[label] = (steady(wall), steady(cpu))
    floors = {}
    for threads in (0, 1):
        wall, cpu = floor_times(experiment, selected, seed, threads)
        floors[f"floor, {threads or torch.get_num_threads()} thread(s)"] = (steady(wall), steady(cpu))
    floor = min(wall for wall, _ in floors.values())  # the faster floor is the one to beat
    print(f"{model}: {rounds} rounds x 10 clients, round 1 left out; seconds per round: wall, ratio to the faster "
          "floor, CPU (main process + workers)")
    for label, (wall_s, cpu_s) in {**floors, **rows}.items():
        print(f"  {label:<26} {wall_s:7.3f} s  {wall_s / floor:6.3f}x  cpu {cpu_s:7.3f} s")
    best = min(wall for wall, _ in rows.values()) / floor
    print(f"  best engine {best:.3f} x the floor; target <= {TARGET}: {'met' if best <= TARGET else 'NOT met'}")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds-2nn", type=int, default=8)
    parser.add_argument("--rounds-cnn", type=int, default=4)
    parser.add_argument("--models", default="2nn,simple-cnn")
    parser.add_argument("--engines", default="inprocess,processes", help=f"comma-separated, of: {', '.join(ENGINES)}")
    args = parser.parse_args()
    engines = args.engines.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads by default")
    for model in args.models.split(","):
        rounds = args.rounds_2nn if model == "2nn" else args.rounds_cnn
        bench_model(model, args.data_dir, rounds, args.seed, args.workers, engines)


if __name__ == "__main__":
    main()
