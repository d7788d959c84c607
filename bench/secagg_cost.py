"""Benchmark (not a test): cost of secure aggregation against plain aggregation.

For each number of clients n, one in-process round (:func:`insitu.privacy.secagg.run_round`) with
D-element float32 vectors: client compute time (per client, all four rounds), server compute time,
and bytes each client sends and receives (protocol messages under a length-prefixed encoding:
32 B public keys, 160 B encrypted share pairs, 4*D B masked vector, 66 B revealed shares). Plain
aggregation is 4*D bytes of float32 up per client and one numpy sum at the server. Threshold
t = floor(n/2) + 1 unless --t-fraction says otherwise; dropouts (--dropout 0.1) go silent before
sending their masked input, the costly case for the server (their pairwise masks are recomputed).

    python bench/secagg_cost.py                 # n in 10, 50, 100; D = 100_000
    python bench/secagg_cost.py --dropout 0.1
    python bench/secagg_cost.py --degree 20     # SecAgg+ neighbour graph of degree 20
    python bench/secagg_cost.py --quick         # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np

from insitu.privacy.secagg import SecAggConfig, run_round


def plain_server_seconds(vectors: list[np.ndarray], repeats: int = 5) -> float:
    """Median time of the plain FedAvg sum of float32 vectors."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.sum(vectors, axis=0, dtype=np.float32)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(n: int, dim: int, dropout: float, t_fraction: float, degree: int | None, seed: int) -> dict[str, float]:
    """One secure round and its plain counterpart; return the costs."""
    group = n if degree is None or degree >= n else degree + 1
    t = max(math.floor(group * t_fraction) + 1, 2)
    cfg = SecAggConfig(n=n, t=min(t, group), dim=dim, bound=1.0, degree=degree if degree and degree < n else None)
    rng = np.random.default_rng(seed)
    inputs = {c: rng.uniform(-1, 1, dim).astype(np.float32) for c in cfg.client_ids}
    n_drop = round(dropout * n)
    dropped = sorted(rng.choice(list(cfg.client_ids), size=n_drop, replace=False).tolist()) if n_drop else []
    start = time.perf_counter()
    report = run_round(cfg, inputs, drop_before={"masked": dropped})
    wall = time.perf_counter() - start
    expected = np.sum([inputs[c].astype(np.float64) for c in report.included], axis=0)
    error = float(np.abs(report.total - expected).max())
    assert error <= cfg.fixed_point.max_abs_error, (error, cfg.fixed_point.max_abs_error)
    survivors = report.included
    client_s = [report.client_seconds[c] for c in survivors]
    sent = [report.bytes_sent[c] for c in survivors]
    received = [report.bytes_received[c] for c in survivors]
    plain_bytes = 4 * dim
    return {
        "n": n,
        "t": cfg.t,
        "degree": cfg.group_size - 1,
        "dropped": n_drop,
        "client_ms": 1e3 * statistics.mean(client_s),
        "client_max_ms": 1e3 * max(client_s),
        "server_s": report.server_seconds,
        "plain_server_ms": 1e3 * plain_server_seconds([inputs[c] for c in survivors]),
        "sent_kb": statistics.mean(sent) / 1e3,
        "recv_kb": statistics.mean(received) / 1e3,
        "plain_kb": plain_bytes / 1e3,
        "expansion": statistics.mean(sent) / plain_bytes,
        "wall_s": wall,
        "max_err": error,
    }


COLUMNS = [  # (key, width, format spec)
    ("n", 4, "d"), ("t", 4, "d"), ("degree", 6, "d"), ("dropped", 7, "d"),
    ("client_ms", 9, ".1f"), ("client_max_ms", 13, ".1f"), ("server_s", 8, ".3f"),
    ("plain_server_ms", 15, ".3f"), ("sent_kb", 8, ".1f"), ("recv_kb", 8, ".1f"),
    ("plain_kb", 8, ".1f"), ("expansion", 9, ".4f"), ("wall_s", 7, ".2f"), ("max_err", 9, ".2e"),
]


def print_row(row: dict[str, float] | None) -> None:
    """Print the header (None) or one result row."""
    if row is None:
        print(" ".join(f"{key:>{width}}" for key, width, _ in COLUMNS))
    else:
        print(" ".join(f"{row[key]:>{width}{spec}}" for key, width, spec in COLUMNS), flush=True)


def main() -> None:
    """Parse options, run the sizes, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--dim", type=int, default=100_000)
    parser.add_argument("--dropout", type=float, default=0.0, help="fraction dropping before their masked input")
    parser.add_argument("--t-fraction", type=float, default=0.5, help="t = floor(group * fraction) + 1")
    parser.add_argument("--degree", type=int, default=None, help="SecAgg+ neighbour-graph degree (even)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="n in (5, 10), D = 10_000")
    args = parser.parse_args()
    clients, dim = ([5, 10], 10_000) if args.quick else (args.clients, args.dim)
    print(f"D={dim}, dropout={args.dropout:.0%}, times are compute on this machine, bytes are per surviving client")
    print_row(None)
    for n in clients:
        print_row(measure(n, dim, args.dropout, args.t_fraction, args.degree, args.seed))


if __name__ == "__main__":
    main()
