"""A million simulated clients: peak memory and per-round time do not grow with the population.

Runs the synthetic(alpha, beta) dataset (LEAF / FedProx; each client generated from (seed, client) when
sampled) with 100 clients per round and logistic regression on its 60 features, once with N = 10,000
and once with N = 1,000,000 clients, each in a fresh subprocess so that ``ru_maxrss`` is that run's own
peak. Reports the peak RSS, the build time and the steady per-round time (median over the rounds after
a warm-up, without the rounds that evaluate centrally), and the ratio of the two per-round times.

Targets: peak RSS < 2 GB at N = 1,000,000; per-round times within 10% of each other. The two
populations sample different clients, whose sizes differ; ``--max-examples`` caps a client's examples
(default 100, so most clients hold 50..100) and the per-round time is also reported per 1,000 examples
trained. The per-round CPU time (``time.process_time``, one torch thread) is reported next to the wall
time. On a machine shared with other work neither is steady, so the ratio that counts comes from a third
process that runs both populations' rounds interleaved (round r of each in turn), where both see the same
load: the median over rounds of the per-round time ratio.

    .venv/bin/python bench/million_clients.py [--rounds 30] [--repeats 2] [--sizes 10000 1000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from insitu.simulation import SimulationConfig, build_experiment


def _config(num_clients: int, rounds: int, max_examples: int, seed: int) -> SimulationConfig:
    return SimulationConfig(dataset="synthetic", num_clients=num_clients, fraction_fit=100 / num_clients,
                            min_fit_clients=100, rounds=rounds, model="logreg", local_epochs=1, batch_size=10,
                            lr=0.01, synthetic_max_examples=max_examples, eval_every=rounds, seed=seed)


def paired(sizes: list[int], rounds: int, max_examples: int, seed: int) -> dict[str, float]:
    """Every population's rounds interleaved in one process (round r of each, in turn, order alternating), so
    that all see the same load from other work; the median over rounds of the per-round time ratios."""
    import torch

    from insitu.run.loop import Coordinator

    torch.set_num_threads(1)
    runs = []
    for n in sizes:
        experiment = build_experiment(_config(n, rounds, max_examples, seed))
        coordinator = Coordinator(experiment.strategy, experiment.engine(), num_rounds=rounds, seed=seed)
        params = experiment.initial_parameters
        runs.append([experiment, coordinator, params, experiment.strategy.init_state(params)])
    times: list[list[float]] = [[] for _ in sizes]
    examples: list[list[int]] = [[] for _ in sizes]
    for server_round in range(1, rounds):  # the last round evaluates centrally: left out
        order = range(len(sizes)) if server_round % 2 else reversed(range(len(sizes)))
        for i in order:
            experiment, coordinator, params, state = runs[i]
            began = time.perf_counter()
            record, params, state = coordinator.run_round(server_round, params, state)
            times[i].append(time.perf_counter() - began)
            examples[i].append(sum(len(experiment.train_parts[int(c)]) for c in record.selected))
            runs[i][2:] = [params, state]
    first, last = times[0][3:], times[-1][3:]  # 3 warm-up rounds
    per_ex = [(b / eb) / (a / ea) for a, b, ea, eb in zip(first, last, examples[0][3:], examples[-1][3:])]
    return {"rounds_timed": len(first), "round_s_first": statistics.median(first),
            "round_s_last": statistics.median(last),
            "ratio": statistics.median(b / a for a, b in zip(first, last)), "ratio_per_example": statistics.median(per_ex)}


def child(num_clients: int, rounds: int, max_examples: int, seed: int) -> dict[str, float]:
    """One population in this process: build, run, measure."""
    import numpy as np
    import torch

    torch.set_num_threads(1)  # one core per run: steadier timings on a shared machine
    config = _config(num_clients, rounds, max_examples, seed)
    started = time.perf_counter()
    experiment = build_experiment(config)
    build_s = time.perf_counter() - started
    # the framework's own per-round cost, without training: available ids + sampling 100 of N
    pool, strategy = experiment.engine(), experiment.strategy
    sampling = []
    for i in range(200):
        began = time.perf_counter()
        strategy.sample_fit(pool.wait_for(strategy.min_available_clients), np.random.default_rng([seed, i]))
        sampling.append(time.perf_counter() - began)
    cpu_marks = [time.process_time()]  # CPU seconds per round: far less disturbed by other work than wall time
    result = experiment.run(on_round=lambda _record, _p, _s: cpu_marks.append(time.process_time()))
    records = result.history.rounds
    cpu = {r.round: cpu_marks[i + 1] - cpu_marks[i] for i, r in enumerate(records)}
    steady = [r for r in records[3:] if r.centralized is None]  # 3 warm-up rounds; no evaluating round
    sizes = experiment.train_parts
    per_round = [r.timings["total_s"] for r in steady]
    examples = [sum(len(sizes[int(c)]) for c in r.selected) for r in steady]
    per_1k = [t / e * 1000 for t, e in zip(per_round, examples)]
    return {
        "num_clients": num_clients,
        "rounds_timed": len(steady),
        "clients_per_round": statistics.mean(len(r.selected) for r in steady),
        "build_s": build_s,
        "sample_us": statistics.median(sampling) * 1e6,
        "round_s_median": statistics.median(per_round),
        "round_s_mean": statistics.mean(per_round),
        "round_cpu_s_median": statistics.median(cpu[r.round] for r in steady),
        "examples_per_round": statistics.mean(examples),
        "round_s_per_1k_examples": statistics.median(per_1k),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="Runs per population, interleaved (A B A B); the "
                        "fastest median counts (the least disturbed by other work on the machine).")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--paired-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.rounds, args.max_examples, args.seed)))
        return
    if args.paired_child:
        print(json.dumps(paired(args.sizes, args.rounds, args.max_examples, args.seed)))
        return
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.sizes}
    for _ in range(args.repeats):
        for n in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--rounds", str(args.rounds),
                                  "--max-examples", str(args.max_examples), "--seed", str(args.seed)],
                                 check=True, capture_output=True, text=True).stdout
            runs[n].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  N={n:,}: median round {runs[n][-1]['round_s_median']:.3f} s", flush=True)
    rows = [min(runs[n], key=lambda r: r["round_s_median"]) for n in args.sizes]
    for n, row in zip(args.sizes, rows):
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs[n])
    print(f"{'clients':>10} {'peak RSS MB':>12} {'build s':>8} {'round s (median)':>17} {'round s (mean)':>15} "
          f"{'round CPU s':>12} {'examples/round':>15} {'s per 1k ex':>12} {'sample us':>10}")
    for r in rows:
        print(f"{r['num_clients']:>10,} {r['peak_rss_mb']:>12.0f} {r['build_s']:>8.2f} {r['round_s_median']:>17.3f} "
              f"{r['round_s_mean']:>15.3f} {r['round_cpu_s_median']:>12.3f} {r['examples_per_round']:>15.0f} {r['round_s_per_1k_examples']:>12.4f} {r['sample_us']:>10.0f}")
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        ratio = last["round_s_median"] / first["round_s_median"]
        ratio_1k = last["round_s_per_1k_examples"] / first["round_s_per_1k_examples"]
        ratio_cpu = last["round_cpu_s_median"] / first["round_cpu_s_median"]
        print(f"per-round time ratio N={last['num_clients']:,} / N={first['num_clients']:,}: wall {ratio:.3f} "
              f"(per 1k examples: {ratio_1k:.3f}), CPU {ratio_cpu:.3f}; target within 10%: "
              f"{'met' if abs(ratio - 1) <= 0.1 else 'NOT met'} (wall), {'met' if abs(ratio_cpu - 1) <= 0.1 else 'NOT met'} (CPU)")
        out = subprocess.run([sys.executable, __file__, "--paired-child", "--sizes", *map(str, args.sizes), "--rounds",
                              str(args.rounds), "--max-examples", str(args.max_examples), "--seed", str(args.seed)],
                             check=True, capture_output=True, text=True).stdout
        pair = json.loads(out.strip().splitlines()[-1])
        print(f"interleaved in one process ({pair['rounds_timed']} round pairs): median round "
              f"{pair['round_s_first']:.3f} s vs {pair['round_s_last']:.3f} s; median per-round ratio "
              f"{pair['ratio']:.3f} (per example: {pair['ratio_per_example']:.3f}); target within 10%: "
              f"{'met' if abs(pair['ratio'] - 1) <= 0.1 else 'NOT met'}")
        print(f"peak RSS at N={last['num_clients']:,}: {last['peak_rss_mb']:.0f} MB; target < 2048 MB: "
              f"{'met' if last['peak_rss_mb'] < 2048 else 'NOT met'}")


if __name__ == "__main__":
    main()
