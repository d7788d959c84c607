"""Benchmark (not a test): the Ray engine on a two-node Ray cluster on this machine, against the floor.

Starts a head node and a worker node (``ray start``, 1 CPU each), connects to them and runs
``bench/engines.py``'s MNIST task (100 IID clients, 10 per round, E=1, B=32; 2NN and SimpleCNN) with
the ``ray`` engine, 2 actors (one per node), beside the single-process floors; ``ray stop`` at the
end. Needs Ray: pip install 'insitu[ray]'.

Issue 13's target for this setting: the Ray engine <= 0.75 x the single-process floor.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engines  # bench/engines.py: the task, the floor and the timing

from insitu.engines.ray_loopback import DRIVER_ENV

LOOPBACK_RAY = [sys.executable, "-m", "insitu.engines.ray_loopback"]  # nodes stay on 127.0.0.1
TARGET = 0.75


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(engines.DEFAULT_DATA))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds-2nn", type=int, default=8)
    parser.add_argument("--rounds-cnn", type=int, default=4)
    parser.add_argument("--models", default="2nn,simple-cnn")
    parser.add_argument("--engines", default="ray", help="also e.g. ray,inprocess,processes")
    args = parser.parse_args()
    os.environ.update(DRIVER_ENV)  # this driver resolves itself to 127.0.0.1 too (before importing ray)
    import ray

    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's unix sockets live under it
    try:
        subprocess.run([*LOOPBACK_RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                       check=True, capture_output=True)
        subprocess.run([*LOOPBACK_RAY, "start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                        "--disable-usage-stats"], check=True, capture_output=True)
        ray.init(address=address, log_to_driver=False)
        nodes = [node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]]
        if set(nodes) != {"127.0.0.1"}:
            raise SystemExit(f"the Ray cluster left loopback: nodes at {nodes}")
        print(f"Ray {ray.__version__}: {len(ray.nodes())} nodes, {ray.cluster_resources().get('CPU')} CPUs")
        for model in args.models.split(","):
            rounds = args.rounds_2nn if model == "2nn" else args.rounds_cnn
            best = engines.bench_model(model, args.data_dir, rounds, args.seed, 2, args.engines.split(","))
            print(f"  {model}: best engine {best:.3f} x the floor; Ray target <= {TARGET}: "
                  f"{'met' if best <= TARGET else 'NOT met'}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([*LOOPBACK_RAY, "stop", "--force"], check=False, capture_output=True)


if __name__ == "__main__":
    main()
