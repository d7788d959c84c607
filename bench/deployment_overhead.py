"""Benchmark (not a test): per-round cost of the gRPC deployment over the in-process simulation.

Same task on both engines: FedAvg on MNIST, 2NN, IID, all clients every round, 1 local epoch,
batch 32, lr 0.01, ~600 examples per client (``train_limit = 600 x clients``), evaluation off.

* in-process: ``Coordinator`` over ``InProcessPool`` (clients trained one after another here);
* gRPC: a plaintext loopback ``FederationServer`` in this process and one OS process per client
  (``multiprocessing`` "spawn"), each building its client exactly as
  ``build_experiment(config).client_fn(str(i))`` does and calling ``connect``. Seconds per round
  come from the server's round records (``timings["total_s"]``), after all clients connected.
  Client processes train in parallel (on this machine's cores), so gRPC may even be faster.

A second variant, "echo", has every client return the parameters it received, unchanged, with
num_examples=600: no training, so it isolates the per-round protocol cost (serialize, transfer,
decode, validate, aggregate). The gRPC client processes serve both variants (the server's fit
config says which), so they start only once per client count.

Timed runs follow one untimed warm-up round on each engine. Client processes use 1 torch thread
each (``--client-threads``): with torch's default (2 here) 20 processes on 2 cores thrash.

With ``--secure``, the gRPC side also runs both variants with secure aggregation on (the four
SecAgg steps per round, ``secure_aggregation = true``), and a second table sets them against the
plain gRPC rounds: the price of the server learning only the sum.

Finally a 3-client training run of each engine, same seed, with as many torch threads in the
client processes as here (the thread count changes training's float rounding), is compared bit
for bit. If they differ, the in-process run is repeated folding the results in the order they
arrived over gRPC, to tell summation order apart from a difference in the training itself.

    python bench/deployment_overhead.py [--data-dir ../shared/data/mnist] [--clients 3,20] [--rounds 3] [--secure]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from insitu.client.api import EvalResult, FitResult
from insitu.engines import InProcessPool, Task
from insitu.params import Parameters
from insitu.run import Coordinator
from insitu.simulation import SimulationConfig, build_experiment, make_strategy

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
EXAMPLES_PER_CLIENT = 600


def make_config(num_clients: int, data_dir: str, rounds: int, seed: int) -> SimulationConfig:
    return SimulationConfig(dataset="mnist", data_dir=data_dir, model="2nn", partition="iid", num_clients=num_clients,
                            fraction_fit=1.0, min_fit_clients=num_clients, fraction_evaluate=0.0, rounds=rounds,
                            local_epochs=1, batch_size=32, lr=0.01, seed=seed,
                            train_limit=EXAMPLES_PER_CLIENT * num_clients)


class EchoClient:
    """Returns the received parameters unchanged: a round with no training, only protocol."""

    def fit(self, parameters: Parameters, config: dict) -> FitResult:
        return FitResult(parameters, EXAMPLES_PER_CLIENT, {})

    def evaluate(self, parameters: Parameters, config: dict) -> EvalResult:
        return EvalResult(0.0, 0, {})


class BenchClient:
    """The real TorchClient, or an echo when the server's fit config carries ``echo``."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.echo = EchoClient()

    def fit(self, parameters: Parameters, config: dict) -> FitResult:
        if config.get("echo"):
            return self.echo.fit(parameters, config)
        return self.inner.fit(parameters, config)

    def evaluate(self, parameters: Parameters, config: dict) -> EvalResult:
        return self.inner.evaluate(parameters, config)


def client_process(address: str, index: int, config: SimulationConfig, threads: int) -> None:
    """One deployed client (runs in its own process): build it like the simulation does, serve it."""
    if threads:
        torch.set_num_threads(threads)
    from insitu.net.client import connect

    experiment = build_experiment(config)
    client = BenchClient(experiment.client_fn(str(index)))
    connect(client, address, client_id=str(index), give_up_after_s=120.0, poll_wait_s=10.0)


class OrderedPool(InProcessPool):
    """InProcessPool that runs (and so folds) each round's clients in a given order."""

    def __init__(self, client_fn, num_clients: int, orders: dict[int, list[str]]) -> None:
        super().__init__(client_fn, num_clients)
        self.orders = orders

    def fit(self, parameters: Parameters, tasks: Sequence[Task]) -> Iterator:
        order = self.orders.get(int(tasks[0].config.get("round", 0)), [t.client_id for t in tasks]) if tasks else []
        rank = {cid: i for i, cid in enumerate(order)}
        return super().fit(parameters, sorted(tasks, key=lambda t: rank.get(t.client_id, len(rank))))


def run_inprocess(config: SimulationConfig, echo: bool, orders: dict[int, list[str]] | None = None,
                  warmup: bool = True) -> tuple[list[float], Parameters]:
    experiment = build_experiment(config)
    experiment.strategy.evaluate_fn = None
    client_fn = (lambda cid: EchoClient()) if echo else experiment.client_fn
    pool = (OrderedPool(client_fn, config.num_clients, orders) if orders is not None
            else InProcessPool(client_fn, config.num_clients))
    if warmup:  # first-call costs (allocator, kernels, optimizer cache), as the gRPC side gets too
        Coordinator(experiment.strategy, pool, num_rounds=1, seed=config.seed, evaluate_initial=False
                    ).run(experiment.initial_parameters)
    times: list[float] = []
    coordinator = Coordinator(experiment.strategy, pool, num_rounds=config.rounds, seed=config.seed,
                              evaluate_initial=False,
                              on_round=lambda record, _p, _s: times.append(record.timings["total_s"]))
    result = coordinator.run(experiment.initial_parameters)
    _check_rounds(result.history.rounds, f"in-process {'echo' if echo else 'train'}")
    return times, result.parameters


def _check_rounds(records, label: str) -> None:
    for record in records:
        if record.status != "ok" or record.failures:
            raise RuntimeError(f"{label}: round {record.round} {record.status}: {record.error} {record.failures}")


def run_grpc(config: SimulationConfig, threads: int, connect_timeout: float,
             variants: tuple[str, ...] = ("train", "echo"), warmup: bool = True) -> dict:
    """Server here, one process per client; per-round times of each variant and the trained result.

    With ``warmup``, one training round (not timed) runs first so that first-call costs in the fresh
    client processes are not counted; the timed runs then start again from the initial parameters.
    """
    from insitu.net.server import FederationServer, ServerSettings

    n = config.num_clients
    experiment = build_experiment(config)  # the same initial parameters as the in-process run
    settings = ServerSettings(address="127.0.0.1:0", insecure=True, store_path=None, round_timeout_s=300.0,
                              heartbeat_timeout_s=60.0, max_clients=max(n, 8))
    server = FederationServer(settings)  # 600 handshakes/min/host by default: enough for 20 local clients
    address = f"127.0.0.1:{server.port}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=client_process, args=(address, i, config, threads), daemon=True) for i in range(n)]
    out: dict = {}
    try:
        started = time.perf_counter()
        for p in procs:
            p.start()
        server.pool.wait_for(n, timeout=connect_timeout)
        out["connect_s"] = time.perf_counter() - started
        if warmup:
            strategy = make_strategy(config, None)
            strategy.min_available_clients = n
            server.run(strategy, experiment.initial_parameters, num_rounds=1, seed=config.seed)
        for variant in variants:
            secure = variant.startswith("secure-")
            strategy = make_strategy(dataclasses.replace(config, secure_aggregation=secure), None)
            strategy.min_available_clients = n
            if variant.endswith("echo"):
                strategy.fit_config = {"echo": 1}
            times: list[float] = []
            result = server.run(strategy, experiment.initial_parameters, num_rounds=config.rounds, seed=config.seed,
                                on_round=lambda record, _p, _s, times=times: times.append(record.timings["total_s"]))
            _check_rounds(result.history.rounds, f"gRPC {variant}")
            out[variant] = times
            if variant == "train":
                out["parameters"] = result.parameters
                out["arrival"] = {r.round: list(r.clients) for r in result.history.rounds}
    finally:
        server.stop(grace_s=10.0)
        for p in procs:
            p.join(timeout=15.0)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
    return out


def check_identity(args: argparse.Namespace) -> bool:
    """3 clients, same seed: are the final parameters of both engines bit-identical?

    The client processes use as many torch threads as this process (the in-process run's): the
    thread count changes the float rounding of training, which would mask what the engines do.
    """
    config = make_config(3, args.data_dir, args.rounds, args.seed)
    _, ip_params = run_inprocess(config, echo=False, warmup=False)
    out = run_grpc(config, torch.get_num_threads(), args.connect_timeout, variants=("train",), warmup=False)
    same = ip_params == out["parameters"]
    diff = float(np.max(np.abs(ip_params.flat() - out["parameters"].flat())))
    print(f"[identity] 3 clients, seed {args.seed}, {torch.get_num_threads()} torch threads everywhere: final "
          f"parameters bit-identical in-process vs gRPC: {same}" + ("" if same else f" (max |diff| {diff:.3g})"))
    print(f"[identity] gRPC folded the results in arrival order: {out['arrival']} (in-process: 0, 1, 2)")
    if not same:
        _, reordered = run_inprocess(config, echo=False, orders=out["arrival"], warmup=False)
        print(f"[identity] in-process run folding in gRPC's arrival order is bit-identical to gRPC: "
              f"{reordered == out['parameters']}")
    return same


def print_comparison(columns: tuple[str, str, str], rows: list[tuple[int, str, list[float], list[float]]]) -> None:
    """A table of mean s/round: baseline, compared, their difference and ratio, per (clients, variant)."""
    widths = [max(len(c), 12) for c in columns]
    print()
    print(f"{'clients':>7} | {'variant':>7} | " + " | ".join(f"{c:>{w}}" for c, w in zip(columns, widths))
          + f" | {'ratio':>6}")
    for n, variant, base, other in rows:
        a, b = statistics.mean(base), statistics.mean(other)
        cells = " | ".join(f"{v:>{w}.4f}" for v, w in zip((a, b, b - a), widths))
        print(f"{n:>7} | {variant:>7} | {cells} | {b / a:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--clients", default="3,20", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client-threads", type=int, default=1,
                        help="torch threads per client process (0 = torch's default); the server process keeps its own")
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument("--skip-identity", action="store_true", help="skip the bit-identity check")
    parser.add_argument("--secure", action="store_true", help="also time gRPC rounds with secure aggregation")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads here, {args.client_threads or 'default'} per "
          f"client process; {mp.cpu_count()} CPUs; {args.rounds} rounds; mean s/round over all rounds")
    rows = []
    secure_rows = []
    identical = None
    for n in [int(c) for c in args.clients.split(",")]:
        config = make_config(n, args.data_dir, args.rounds, args.seed)
        ip_train, _ = run_inprocess(config, echo=False)
        ip_echo, _ = run_inprocess(config, echo=True)
        variants = ("train", "echo", "secure-train", "secure-echo") if args.secure else ("train", "echo")
        grpc_out = run_grpc(config, args.client_threads, args.connect_timeout, variants)
        print(f"[{n} clients] client processes connected {grpc_out['connect_s']:.1f} s after spawn (not counted)")
        print(f"[{n} clients] per-round s: in-process train {[round(t, 3) for t in ip_train]}, gRPC train "
              f"{[round(t, 3) for t in grpc_out['train']]}, in-process echo {[round(t, 4) for t in ip_echo]}, "
              f"gRPC echo {[round(t, 4) for t in grpc_out['echo']]}")
        rows.append((n, "train", ip_train, grpc_out["train"]))
        rows.append((n, "echo", ip_echo, grpc_out["echo"]))
        if args.secure:
            print(f"[{n} clients] per-round s with secure aggregation: gRPC train "
                  f"{[round(t, 3) for t in grpc_out['secure-train']]}, gRPC echo "
                  f"{[round(t, 4) for t in grpc_out['secure-echo']]}")
            secure_rows += [(n, v, grpc_out[v], grpc_out[f"secure-{v}"]) for v in ("train", "echo")]
    if not args.skip_identity:
        identical = check_identity(args)
    print_comparison(("in-process s/round", "gRPC s/round", "overhead s/round"), rows)
    print("train: clients train in parallel as processes under gRPC (2 cores here), one after another in-process;"
          "\necho: no training, the protocol cost alone (serialize, transfer, decode, validate, aggregate).")
    if secure_rows:
        print_comparison(("gRPC plain s/round", "gRPC secure s/round", "extra s/round"), secure_rows)
        print("secure: the four SecAgg steps per round (keys, encrypted shares, masked input, unmask) over the "
              "same connections.")
    if identical is not None:
        print(f"3 clients, same seed: final parameters bit-identical across engines: {identical}")
        if not identical:
            print("(see [identity] above: the gRPC pool folds results in arrival order, float32 sums are not associative)")


if __name__ == "__main__":
    main()
