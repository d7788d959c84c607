"""FedBuff over gRPC with real client processes and injected delays reaches the simulated run's accuracy.

Runs bench/fedbuff_grpc.py's own code (so the bench cannot rot) at a small size: digits, logistic
regression, 3 client processes whose delays follow the simulation's log-normal speeds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fedbuff_grpc.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("fedbuff_grpc_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fedbuff_over_grpc_matches_the_simulated_accuracy():
    bench = load_bench()
    args = bench.parser().parse_args(["--dataset", "digits", "--data-dir", "", "--model", "logreg", "--clients", "3",
                                      "--steps", "8", "--buffer-size", "2", "--concurrency", "3", "--batch-size", "16",
                                      "--base-delay", "0.1", "--timeout", "300"])
    simulated = bench.simulate(args)
    deployed = bench.over_grpc(args)
    assert len(deployed.rounds) == len(simulated.rounds) == 8
    assert all(r.status == "ok" for r in deployed.rounds)
    # different arrival orders, same algorithm: the accuracies agree within a few points
    assert simulated.final_accuracy > 0.8
    assert abs(deployed.final_accuracy - simulated.final_accuracy) < 0.04
    # asynchrony really happened over the network: some update arrived stale
    assert max(r.fit_metrics["staleness_max"] for r in deployed.rounds) >= 1
