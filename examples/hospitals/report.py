"""Print a hospital run's per-hospital and worst-hospital accuracy from the server's history.json.

Each hospital evaluates the global model on its own test folder after every round (federated evaluation,
``--fraction-evaluate 1``); the server keeps each one's result under ``rounds[i].clients[<id>]``
(``eval_accuracy``, ``eval_examples``, ``eval_loss``). Under central DP that needs
``--dp-record-client-metrics``: these per-hospital numbers are not covered by epsilon.

    python examples/hospitals/report.py RUN/server/history.json [--json summary.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def summarize(history: dict[str, Any]) -> dict[str, Any]:
    """The last round with per-hospital evaluations: each hospital's accuracy, the worst and the mean (weighted
    by test examples), the server's reference-set accuracy, epsilon if DP was on, and the accuracy curve."""
    rounds = [r for r in history.get("rounds", []) if r.get("status") == "ok"]
    evaluated = [r for r in rounds if any("eval_accuracy" in c for c in r.get("clients", {}).values())]
    if not evaluated:
        raise ValueError("no round has per-hospital evaluations: run the server with --fraction-evaluate 1 "
                         "(and, under DP, --dp-record-client-metrics)")
    last = evaluated[-1]
    hospitals = {cid: {"accuracy": c["eval_accuracy"], "examples": int(c.get("eval_examples", 0)),
                       "loss": c.get("eval_loss")}
                 for cid, c in sorted(last["clients"].items()) if "eval_accuracy" in c}
    worst = min(hospitals, key=lambda cid: hospitals[cid]["accuracy"])
    examples = sum(h["examples"] for h in hospitals.values())
    central = last.get("centralized") or {}
    initial = history.get("initial") or {}
    return {
        "round": last["round"],
        "hospitals": hospitals,
        "worst": {"hospital": worst, "accuracy": hospitals[worst]["accuracy"]},
        "mean": sum(h["accuracy"] * h["examples"] for h in hospitals.values()) / max(examples, 1),
        "reference_accuracy": central.get("metrics", {}).get("accuracy"),
        "initial_reference_accuracy": initial.get("metrics", {}).get("accuracy"),
        "epsilon": last.get("fit_metrics", {}).get("epsilon"),
        "worst_per_round": [min(c["eval_accuracy"] for c in r["clients"].values() if "eval_accuracy" in c)
                            for r in evaluated],
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A small table: one line per hospital, then the worst, the mean and the server's reference accuracy."""
    lines = [(f"Per-hospital accuracy of the global model after round {summary['round']} "
              "(each hospital's own test folder):")]
    for cid, h in summary["hospitals"].items():
        lines.append(f"  {cid:<14} {100 * h['accuracy']:6.2f}%   ({h['examples']} test images)")
    lines.append(f"  {'worst':<14} {100 * summary['worst']['accuracy']:6.2f}%   ({summary['worst']['hospital']})")
    lines.append(f"  {'mean':<14} {100 * summary['mean']:6.2f}%   (weighted by test images)")
    if summary["reference_accuracy"] is not None:
        start = summary["initial_reference_accuracy"]
        lines.append(f"Server's reference set: {100 * summary['reference_accuracy']:.2f}%"
                     + (f" (initial model {100 * start:.2f}%)" if start is not None else ""))
    if summary["epsilon"] is not None:
        lines.append(f"Privacy spent: epsilon {summary['epsilon']:.4g} (central DP, per hospital)")
    lines.append("Worst-hospital accuracy per round: "
                 + " ".join(f"{100 * a:.0f}%" for a in summary["worst_per_round"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("history", type=Path, help="The server's history.json.")
    parser.add_argument("--json", type=Path, help="Also write the summary here as JSON.")
    args = parser.parse_args(argv)
    try:
        summary = summarize(json.loads(args.history.read_text()))
    except (OSError, ValueError) as error:
        print(f"error: {args.history}: {error}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
