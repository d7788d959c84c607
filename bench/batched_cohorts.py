"""Benchmark (not a test): batched cohorts (``--cohort-batching``) against the one-client-at-a-time loop.

FedAvg on MNIST with the 2NN, 100 clients (IID, ~600 rows each), K sampled per round (K = 10, 50, 100
by default), 1 local epoch, batch 32, on the CPU. For each K both engines run the same rounds through
the real round loop (sampling, validation, streaming FedAvg), interleaved round by round from the same
global model so machine noise hits both alike: the in-process engine (each client's own TorchClient
loop) and the BatchedPool (the round's K clients as one vmap computation). The first round is a
warm-up; the headline is the ratio of the summed round times, sequential / batched, measured in the
same run. The largest parameter difference between the two is printed as a check (float32 rounding).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from insitu.engines import InProcessPool
from insitu.engines.cohort import BatchedPool
from insitu.engines.heap import frozen_heap
from insitu.run import Coordinator
from insitu.simulation import SimulationConfig, build_experiment

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def bench_cohort(k: int, data_dir: str, rounds: int, seed: int, model: str) -> float:
    """Seconds of ``rounds`` timed rounds (after one warm-up) for both engines; returns sequential/batched."""
    config = SimulationConfig(dataset="mnist", data_dir=data_dir, model=model, num_clients=100, partition="iid",
                              fraction_fit=k / 100, min_fit_clients=1, fraction_evaluate=0.0, rounds=rounds + 1,
                              local_epochs=1, batch_size=32, lr=0.01, seed=seed)
    experiment = build_experiment(config)
    experiment.strategy.evaluate_fn = None
    sequential = Coordinator(experiment.strategy, InProcessPool(experiment.client_fn, 100), num_rounds=rounds + 1,
                             seed=seed, evaluate_initial=False)
    batched_pool = BatchedPool(experiment.client_fn, 100)
    batched = Coordinator(experiment.strategy, batched_pool, num_rounds=rounds + 1, seed=seed, evaluate_initial=False)
    parameters = experiment.initial_parameters
    state_a = experiment.strategy.init_state(parameters)
    state_b = experiment.strategy.init_state(parameters)
    seconds_a, seconds_b, largest = 0.0, 0.0, 0.0
    with frozen_heap():
        for server_round in range(1, rounds + 2):
            started = time.perf_counter()
            record_a, after_a, state_a = sequential.run_round(server_round, parameters, state_a)
            took_a = time.perf_counter() - started
            started = time.perf_counter()
            record_b, after_b, state_b = batched.run_round(server_round, parameters, state_b)
            took_b = time.perf_counter() - started
            assert record_a.selected == record_b.selected and record_b.num_results == k
            largest = max(largest, float(np.abs(after_a.flat() - after_b.flat()).max()))
            if server_round > 1:  # round 1 warms both up
                seconds_a += took_a
                seconds_b += took_b
            parameters = after_a
    assert batched_pool.cohorts.batched == k * (rounds + 1) and batched_pool.cohorts.sequential == 0
    ratio = seconds_a / seconds_b
    print(f"K={k:>3}: {rounds} rounds | sequential {seconds_a / rounds:7.3f} s/round, batched "
          f"{seconds_b / rounds:7.3f} s/round | speed-up x{ratio:.2f} | max |difference| {largest:.1e}", flush=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--cohorts", default="10,50,100", help="clients per round, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per cohort size (after one warm-up)")
    parser.add_argument("--model", default="2nn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model} on MNIST, B=32, E=1, CPU")
    for k in (int(v) for v in args.cohorts.split(",")):
        bench_cohort(k, args.data_dir, args.rounds, args.seed, args.model)


if __name__ == "__main__":
    main()
