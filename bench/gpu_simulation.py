"""Benchmark (not a test): the simulation on a GPU: compute floor vs in-process clients vs batched cohorts.

FedAvg on MNIST with the 2NN (or --model), 100 clients (IID), K sampled per round (--cohorts, default
10 and 100), 1 local epoch, batch 32, everything on ``--device`` (default cuda): the data and the
model are moved there once (``device`` setting). Per round, from the same global model, three runs of
the same SGD steps (same clients, shuffles and batches):

* floor: one hand-written PyTorch loop over the round's clients on one model (no federation);
* in-process: the real round loop with the in-process engine (each client's TorchClient loop);
* batched: the same round loop with the BatchedPool (the round's K clients as one vmap computation).

The first round is a warm-up (CUDA context, kernels, allocator); every timing synchronizes the device.
Prints seconds per round and the ratios in-process/floor, batched/floor and in-process/batched.
Without a CUDA device it prints "no CUDA device, skipping" and exits 0; ``--device cpu`` runs the
same measurement on the CPU (a smoke test of this script).
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
from insitu.run import Coordinator, client_seed
from insitu.simulation import SimulationConfig, build_experiment

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_round(experiment, parts: list[torch.Tensor], server_round: int, chosen: list[str], seed: int,
                device: torch.device) -> None:
    """The round's SGD steps in a plain loop over one model (the global model already loaded)."""
    cfg, model = experiment.config, experiment.model
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = experiment.train.x, experiment.train.y
    model.train()
    for cid in chosen:
        index = parts[int(cid)]
        generator = torch.Generator().manual_seed(client_seed(seed, server_round, cid))
        order = index[torch.randperm(len(index), generator=generator)].to(device)
        for rows in order.split(cfg.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x.index_select(0, rows)), y.index_select(0, rows))
            loss.backward()
            optimizer.step()


def bench(k: int, args: argparse.Namespace) -> None:
    config = SimulationConfig(dataset="mnist", data_dir=args.data_dir, model=args.model, num_clients=100,
                              partition="iid", fraction_fit=k / 100, min_fit_clients=1, fraction_evaluate=0.0,
                              rounds=args.rounds + 1, local_epochs=1, batch_size=32, lr=0.01, seed=args.seed,
                              device=args.device)
    experiment = build_experiment(config)
    device = experiment.train.x.device
    experiment.strategy.evaluate_fn = None
    rounds = args.rounds + 1
    plain = Coordinator(experiment.strategy, InProcessPool(experiment.client_fn, 100), num_rounds=rounds,
                        seed=args.seed, evaluate_initial=False)
    batched = Coordinator(experiment.strategy, BatchedPool(experiment.client_fn, 100), num_rounds=rounds,
                          seed=args.seed, evaluate_initial=False)
    parts = [torch.as_tensor(np.asarray(p, dtype=np.int64)) for p in experiment.train_parts]
    parameters = experiment.initial_parameters
    state_a = experiment.strategy.init_state(parameters)
    state_b = experiment.strategy.init_state(parameters)
    totals = {"floor": 0.0, "in-process": 0.0, "batched": 0.0}
    largest = 0.0
    with frozen_heap():
        for server_round in range(1, rounds + 1):
            took: dict[str, float] = {}
            _sync(device)
            started = time.perf_counter()
            record, after_a, state_a = plain.run_round(server_round, parameters, state_a)
            _sync(device)
            took["in-process"] = time.perf_counter() - started
            started = time.perf_counter()
            _, after_b, state_b = batched.run_round(server_round, parameters, state_b)
            _sync(device)
            took["batched"] = time.perf_counter() - started
            parameters.to_module(experiment.model)  # untimed: the floor starts from the same global model
            _sync(device)
            started = time.perf_counter()
            floor_round(experiment, parts, server_round, record.selected, args.seed, device)
            _sync(device)
            took["floor"] = time.perf_counter() - started
            largest = max(largest, float(np.abs(after_a.flat() - after_b.flat()).max()))
            if server_round > 1:  # round 1 warms everything up
                for name, seconds in took.items():
                    totals[name] += seconds
            parameters = after_a
    per_round = {name: seconds / args.rounds for name, seconds in totals.items()}
    print(f"K={k:>3} on {device}: floor {per_round['floor']:.3f} s/round, in-process {per_round['in-process']:.3f}, "
          f"batched {per_round['batched']:.3f} | in-process/floor {totals['in-process'] / totals['floor']:.2f}, "
          f"batched/floor {totals['batched'] / totals['floor']:.2f}, in-process/batched "
          f"{totals['in-process'] / totals['batched']:.2f} | max |in-process - batched| {largest:.1e}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cohorts", default="10,100", help="clients per round, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per cohort size (after one warm-up)")
    parser.add_argument("--model", default="2nn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device, skipping (torch {torch.__version__}: torch.cuda.is_available() is False)")
        return 0
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__} on {name}; {args.model} on MNIST, B=32, E=1")
    for k in (int(v) for v in args.cohorts.split(",")):
        bench(k, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
