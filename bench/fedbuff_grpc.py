"""The same FedBuff run in simulation and over gRPC, with real client processes and injected delays.

A few client processes (``--clients``, default 6) each hold one IID partition and connect to a real
``insitu`` server on loopback. Client i sleeps ``delay_i`` seconds after training each task, with
``delay_i = base_delay / speed_i`` and the speeds drawn from the same log-normal systems model the
simulation uses (so the fast and slow clients are the same ones in both runs). The server runs
FedBuff (``--buffer-size`` updates per step, ``--concurrency`` clients at once). The simulated run
uses the same settings with the systems model; the script prints both final accuracies and their gap.

    python bench/fedbuff_grpc.py --dataset mnist --data-dir ../shared/data/mnist --steps 40
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from insitu.engines.systems import SystemsModel
from insitu.models import build_model
from insitu.net.server import FederationServer, ServerSettings
from insitu.params import Parameters
from insitu.run.history import History
from insitu.simulation import SimulationConfig, build_experiment, central_evaluator, make_fedbuff, make_strategy

CLIENT_SCRIPT = """
import sys, time
from insitu.net.client import connect
from insitu.simulation import SimulationConfig, build_experiment
config = SimulationConfig.from_dict({config!r})
experiment = build_experiment(config)

class Delayed:
    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay
    def fit(self, parameters, task_config):
        result = self.inner.fit(parameters, task_config)
        time.sleep(self.delay)
        return result
    def evaluate(self, parameters, task_config):
        return self.inner.evaluate(parameters, task_config)

cid = sys.argv[1]
sys.exit(connect(Delayed(experiment.client_fn(cid), float(sys.argv[2])), sys.argv[3], client_id=cid,
                 poll_wait_s=0.5, give_up_after_s=60))
"""


def settings_of(args: argparse.Namespace) -> dict[str, object]:
    """The experiment, as SimulationConfig keys (shared by the simulation, the server and every client)."""
    return {"dataset": args.dataset, "data_dir": args.data_dir, "model": args.model, "num_clients": args.clients,
            "rounds": args.steps, "local_epochs": 1, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "mode": "fedbuff", "buffer_size": args.buffer_size, "concurrency": args.concurrency,
            "speed_sigma": args.sigma, "train_limit": args.train_limit, "test_limit": args.test_limit}


def delays(args: argparse.Namespace) -> list[float]:
    """Each client's injected delay: base_delay / its speed under the simulation's systems model."""
    model = SystemsModel(speed_sigma=args.sigma, seed=args.seed)
    return [args.base_delay / model.speed(str(i)) for i in range(args.clients)]


def simulate(args: argparse.Namespace) -> History:
    experiment = build_experiment(SimulationConfig.from_dict(settings_of(args)))
    return experiment.run().history


def over_grpc(args: argparse.Namespace) -> History:
    config = SimulationConfig.from_dict(settings_of(args))
    experiment = build_experiment(config)  # for the test set and the model architecture
    torch.manual_seed(config.seed)
    net = build_model(config.model, experiment.test.input_shape, experiment.test.num_classes)
    strategy = make_strategy(config, central_evaluator(net, experiment.test), remote=True)
    fedbuff = make_fedbuff(config)
    server = FederationServer(ServerSettings(address="127.0.0.1:0", insecure=True, heartbeat_interval_s=0.5))
    address = f"127.0.0.1:{server.port}"
    script = CLIENT_SCRIPT.format(config=settings_of(args))
    clients = [subprocess.Popen([sys.executable, "-c", script, str(i), str(delay), address])
               for i, delay in enumerate(delays(args))]
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = server.run(strategy, Parameters.from_module(net), num_rounds=config.rounds,
                                           seed=config.seed, fedbuff=fedbuff)
        except BaseException as error:  # noqa: BLE001 - reported below
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(args.timeout)
    server.stop(grace_s=2)
    for process in clients:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
    if "error" in outcome:
        raise RuntimeError(f"the gRPC run failed: {outcome['error']}")
    if "result" not in outcome:
        raise RuntimeError(f"the gRPC run did not finish within {args.timeout} s")
    return outcome["result"].history  # type: ignore[attr-defined, no-any-return]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default="../shared/data/mnist")
    p.add_argument("--model", default="2nn")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--buffer-size", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--base-delay", type=float, default=0.5, help="seconds a median-speed client sleeps per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=0)
    p.add_argument("--test-limit", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--out", type=Path, default=None, help="write fedbuff_grpc.json here")
    return p


def main() -> None:
    args = parser().parse_args()
    started = time.perf_counter()
    simulated = simulate(args)
    sim_s = time.perf_counter() - started
    started = time.perf_counter()
    deployed = over_grpc(args)
    grpc_s = time.perf_counter() - started
    sim_acc, grpc_acc = simulated.final_accuracy or 0.0, deployed.final_accuracy or 0.0
    print(f"simulated FedBuff: {len(simulated.rounds)} steps, final accuracy {100 * sim_acc:.2f}% ({sim_s:.0f} s)")
    print(f"gRPC FedBuff ({args.clients} client processes): {len(deployed.rounds)} steps, final accuracy "
          f"{100 * grpc_acc:.2f}% ({grpc_s:.0f} s); gap {100 * (grpc_acc - sim_acc):+.2f} points")
    staleness = [r.fit_metrics.get("staleness_mean", 0.0) for r in deployed.rounds]
    print(f"gRPC mean staleness per step: {sum(staleness) / max(len(staleness), 1):.2f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fedbuff_grpc.json").write_text(json.dumps({
            "settings": {k: str(v) for k, v in vars(args).items()},
            "simulated": [r.accuracy for r in simulated.rounds], "grpc": [r.accuracy for r in deployed.rounds],
        }, indent=1))


if __name__ == "__main__":
    main()
