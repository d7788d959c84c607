"""FedProx vs FedAvg with stragglers doing fewer local epochs (Li et al. 2020, Fig. 1 setting).

MNIST, multinomial logistic regression, non-IID: 100 clients holding 2 digit shards each, 10 sampled
per round, E = 20 local epochs, B = 10, lr 0.03. A share of the sampled clients (0%, 50%, 90%) are
stragglers that can do only 1..E-1 epochs (drawn uniformly) in the round. As in the paper:

- **FedAvg** drops the stragglers (their partial work is discarded);
- **FedProx, mu = 0** keeps the stragglers' partial work;
- **FedProx, mu = 1** keeps it and adds the proximal term (the paper's mu for MNIST).

Prints and writes (``<out>/fedprox_stragglers.json`` and ``.md``) the rounds each needs to reach the
target test accuracy, and plots accuracy per round (``<out>/fedprox_stragglers.png``). Usage::

    python bench/fedprox_stragglers.py --data-dir ../shared/data/mnist --out docs/img
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from insitu.run.history import RoundRecord
from insitu.simulation import SimulationConfig, run_simulation

VARIANTS = {  # label -> (strategy, mu, drop stragglers)
    "FedAvg (drops stragglers)": ("fedavg", 0.0, True),
    "FedProx mu=0 (keeps partial work)": ("fedprox", 0.0, False),
    "FedProx mu=1": ("fedprox", 1.0, False),
}


def run(strategy: str, mu: float, drop: bool, stragglers: float, args: argparse.Namespace) -> list[float]:
    config = SimulationConfig(
        dataset=args.dataset, data_dir=args.data_dir, model="logreg", partition="shards", shards_per_client=2,
        num_clients=100, fraction_fit=0.1, local_epochs=args.epochs, batch_size=10, lr=args.lr,
        rounds=args.rounds, seed=args.seed, strategy=strategy, mu=mu, straggler_fraction=stragglers,
        drop_stragglers=drop, train_limit=args.train_limit, test_limit=args.test_limit,
    )
    accuracies: list[float] = []

    def on_round(record: RoundRecord, *_: object) -> None:
        accuracies.append(record.accuracy or 0.0)

    run_simulation(config, on_round)
    return accuracies


def rounds_to(accuracies: list[float], target: float) -> int | None:
    return next((i + 1 for i, acc in enumerate(accuracies) if acc >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--stragglers", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=0)
    parser.add_argument("--test-limit", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    logging.getLogger("insitu").setLevel(logging.CRITICAL)  # FedAvg's all-straggler rounds fail by design

    results: dict[str, dict[str, list[float]]] = {}
    for share in args.stragglers:
        key = f"{round(100 * share)}%"
        results[key] = {}
        for label, (strategy, mu, drop) in VARIANTS.items():
            results[key][label] = run(strategy, mu, drop, share, args)
            reached = rounds_to(results[key][label], args.target)
            print(f"stragglers {key:>4}  {label:<34} rounds to {100 * args.target:.0f}%: "
                  f"{reached if reached is not None else 'not reached'}  (final {100 * results[key][label][-1]:.2f}%)",
                  flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fedprox_stragglers.json").write_text(json.dumps(
        {"settings": {k: str(v) for k, v in vars(args).items()}, "accuracy_per_round": results}, indent=1))
    lines = [f"| stragglers | {' | '.join(VARIANTS)} |", "|---|" + "---|" * len(VARIANTS)]
    for key, by_label in results.items():
        cells = []
        for label in VARIANTS:
            reached = rounds_to(by_label[label], args.target)
            cells.append(str(reached) if reached is not None else f"> {args.rounds} ({100 * by_label[label][-1]:.1f}%)")
        lines.append(f"| {key} | {' | '.join(cells)} |")
    (args.out / "fedprox_stragglers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6), sharey=True)
    for ax, (key, by_label) in zip(axes if len(results) > 1 else [axes], results.items()):
        for label, accuracies in by_label.items():
            ax.plot(range(1, len(accuracies) + 1), accuracies, label=label)
        ax.axhline(args.target, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{key} stragglers")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    (axes[0] if len(results) > 1 else axes).set_ylabel("test accuracy")
    (axes[-1] if len(results) > 1 else axes).legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "fedprox_stragglers.png", dpi=120)
    print(f"wrote {args.out / 'fedprox_stragglers.png'}")


if __name__ == "__main__":
    main()
