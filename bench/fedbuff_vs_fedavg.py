"""FedBuff vs synchronous FedAvg under heterogeneous client speeds: simulated wall-clock time to a target.

MNIST, 2NN, 100 IID clients, E = 1, B = 10. Every client has a fixed compute speed drawn from
LogNormal(0, sigma) (sigma = 1 by default: the slowest of 100 clients is about 10x slower than the
median, the fastest about 10x faster), a local step takes ``step_seconds / speed`` simulated seconds,
and each task adds ``latency`` seconds. Synchronous FedAvg samples 10 clients a round and waits for the
slowest; FedBuff keeps ``concurrency`` clients training and steps the server every K = 10 updates
(the same number of client updates per server step as FedAvg's per round).

Writes ``<out>/fedbuff_vs_fedavg.json`` (per-step clock and accuracy of both runs) and a plot
``<out>/fedbuff_vs_fedavg.png``; prints the simulated time and server steps each needed to reach the
target accuracy. Usage::

    python bench/fedbuff_vs_fedavg.py --data-dir ../shared/data/mnist --out docs/img
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from insitu.run.history import RoundRecord
from insitu.simulation import SimulationConfig, run_simulation


def run(mode: str, args: argparse.Namespace) -> list[dict[str, float]]:
    config = SimulationConfig(
        dataset=args.dataset, data_dir=args.data_dir, model="2nn", num_clients=100,
        fraction_fit=0.1 if mode == "sync" else 1.0,  # FedBuff: concurrency says how many train at once
        local_epochs=1, batch_size=10, lr=args.lr, rounds=args.max_steps, seed=args.seed, mode=mode,
        buffer_size=10, concurrency=args.concurrency, staleness_exponent=0.5, speed_sigma=args.sigma,
        step_seconds=args.step_seconds, latency=args.latency, stop_at_accuracy=args.target,
        train_limit=args.train_limit, test_limit=args.test_limit,
    )
    points: list[dict[str, float]] = []

    def on_round(record: RoundRecord, *_: object) -> None:
        points.append({"step": record.round, "clock_s": record.timings["clock_s"], "accuracy": record.accuracy or 0.0,
                       "staleness_mean": record.fit_metrics.get("staleness_mean", 0.0)})
        if record.round % 10 == 0:
            print(f"  {mode} step {record.round}: t={record.timings['clock_s']:.1f}s acc={record.accuracy:.4f}",
                  flush=True)

    run_simulation(config, on_round)
    return points


def reached(points: list[dict[str, float]], target: float) -> dict[str, float] | None:
    return next((p for p in points if p["accuracy"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal spread of client speeds")
    parser.add_argument("--step-seconds", type=float, default=0.01)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=0)
    parser.add_argument("--test-limit", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()

    runs = {mode: run(mode, args) for mode in ("sync", "fedbuff")}
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for mode, points in runs.items():
        hit = reached(points, args.target)
        summary[mode] = {"reached": hit is not None, "clock_s": hit["clock_s"] if hit else None,
                         "steps": hit["step"] if hit else None, "final_accuracy": points[-1]["accuracy"],
                         "staleness_mean": sum(p["staleness_mean"] for p in points) / len(points)}
        label = "FedAvg (sync)" if mode == "sync" else "FedBuff"
        if hit:
            print(f"{label}: {100 * args.target:.0f}% at simulated {hit['clock_s']:.1f} s, server step {hit['step']:.0f} "
                  f"(mean staleness {summary[mode]['staleness_mean']:.2f})")
        else:
            print(f"{label}: {100 * args.target:.0f}% not reached in {len(points)} steps "
                  f"(final {100 * points[-1]['accuracy']:.2f}%)")
    if summary["sync"]["clock_s"] and summary["fedbuff"]["clock_s"]:
        print(f"FedBuff / FedAvg simulated time to target: {summary['fedbuff']['clock_s'] / summary['sync']['clock_s']:.2f}")
    (args.out / "fedbuff_vs_fedavg.json").write_text(json.dumps(
        {"settings": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "runs": runs}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, points in runs.items():
        label = "FedAvg, synchronous (10 clients/round)" if mode == "sync" else f"FedBuff (K=10, {args.concurrency} concurrent)"
        ax.plot([p["clock_s"] for p in points], [p["accuracy"] for p in points], label=label)
    ax.axhline(args.target, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("simulated wall-clock time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.85, 1.0)
    ax.set_title(f"MNIST 2NN, 100 clients, speeds ~ LogNormal(0, {args.sigma})")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "fedbuff_vs_fedavg.png", dpi=120)
    print(f"wrote {args.out / 'fedbuff_vs_fedavg.png'}")


if __name__ == "__main__":
    main()
