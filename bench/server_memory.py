"""Benchmark (not a test): a federation server's peak memory while aggregating large updates.

50 clients each return a 10M-value float32 model (40 MB) to a plaintext loopback server running
FedAvg (``fedavg(min_fit_clients=50, min_available_clients=50, fraction_evaluate=0.0)``). The server
runs in its own process, so only its memory is counted; the 50 clients are threads of a second
process, each a trivial Client whose fit returns one precomputed Parameters object shared by all.

In the server process a thread samples VmRSS from /proc/self/status every 5 ms. The baseline is
RSS once the initial parameters exist and all clients are connected, just before round 1; the
peak is the sampler's maximum during the rounds (VmHWM is printed as a cross-check). Round phases
are marked from the round loop: "dispatch" (round start until the first update arrives: the
global model streamed to 50 clients) and "collect" (first update until the round ends: uploads
decoded one at a time, validated, folded, the new global model built).

    python bench/server_memory.py [--clients 50] [--values 10000000] [--rounds 2] [--tracemalloc]
    python bench/server_memory.py --secure --clients 20   # the same with secure aggregation

``--secure`` runs the rounds with secure aggregation (four SecAgg steps per round): the server adds
masked vectors into a running sum as they arrive. Round phases are not split then (the secure path
does not go through ``aggregate_fit``); the peak covers the whole run. Each client thread holds its
update, its float64 protocol input and masks, so the client process needs ~160 MB per client at 10M
values: keep ``--clients`` around 20.

``--tracemalloc`` also reports the peak of Python-visible allocations (numpy arrays, bytes) per
phase, to tell them apart from gRPC core's native buffers (which tracemalloc cannot see); it slows
the server a little.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import threading
import time

import numpy as np

TARGET_MULTIPLE = 3.0
ARRAY_SPLIT = (0.6, 0.4)  # the model: two float32 arrays, 60% and 40% of the values


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


class Sampler(threading.Thread):
    """Samples VmRSS every ``interval`` seconds; keeps (time, MB) pairs."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop_event = threading.Event()

        self.snapshot = None  # with tracemalloc: the allocations at the largest traced total seen
        self._best_traced = 0

    def run(self) -> None:
        import tracemalloc

        last_check = 0.0
        while not self._stop_event.is_set():
            now = time.perf_counter()
            self.samples.append((now, rss_mb()))
            if tracemalloc.is_tracing() and now - last_check > 0.05:
                last_check = now
                current = tracemalloc.get_traced_memory()[0]
                if current > self._best_traced + (8 << 20):
                    self._best_traced = current
                    self.snapshot = tracemalloc.take_snapshot()
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def peak(self, start: float, end: float) -> float:
        return max((mb for t, mb in self.samples if start <= t <= end), default=float("nan"))


def make_parameters(values: int, seed: int):
    from insitu.params import Parameters, ParamSpec

    sizes = [int(values * ARRAY_SPLIT[0])]
    sizes.append(values - sizes[0])
    specs = [ParamSpec(f"layer{i}.weight", (size,), np.dtype(np.float32)) for i, size in enumerate(sizes)]
    flat = np.random.default_rng(seed).standard_normal(values, dtype=np.float32)
    return Parameters.from_flat(flat, specs)  # one 40 MB buffer (from_flat copies it: drop ours)


def server_process(queue, clients: int, values: int, rounds: int, use_tracemalloc: bool,
                   grpc_options: list[tuple[str, int]], secure: bool = False) -> None:
    import logging

    if grpc_options:  # diagnostics only: extra server channel options (what the server would need)
        import insitu.net.server as server_module

        server_module.GRPC_OPTIONS = [*server_module.GRPC_OPTIONS, *grpc_options]

    from insitu.net.server import FederationServer, ServerSettings
    from insitu.strategies import fedavg

    logging.basicConfig(level=logging.WARNING)
    initial = make_parameters(values, seed=0)
    model_mb = initial.flat().nbytes / 2**20
    settings = ServerSettings(address="127.0.0.1:0", insecure=True, store_path=None, round_timeout_s=600.0,
                              heartbeat_timeout_s=120.0, max_clients=clients + 8)
    server = FederationServer(settings)
    # (ServerSettings.max_handshakes_per_minute, default 600 per host, admits 50 clients from one host)
    queue.put(("port", server.port))
    marks: dict[str, list[float]] = {"start": [], "first": [], "last": [], "end": []}
    secure_aggregation = None
    if secure:
        from insitu.privacy.secure import SecureAggregation

        secure_aggregation = SecureAggregation(bound=16.0)  # deltas of two N(0, 1) models stay well inside
    strategy = fedavg(min_fit_clients=clients, min_available_clients=clients, fraction_evaluate=0.0,
                      secure_aggregation=secure_aggregation)
    aggregate_fit = strategy.aggregate_fit

    def marked(results):
        first = True
        for item in results:
            if first:
                marks["first"].append(time.perf_counter())
                first = False
            yield item
            del item  # hold no update while the next one is fetched (as the round loop does)
        marks["last"].append(time.perf_counter())

    def aggregate_marked(parameters, state, results, **kwargs):
        marks["start"].append(time.perf_counter())
        return aggregate_fit(parameters, state, marked(results), **kwargs)

    strategy.aggregate_fit = aggregate_marked  # type: ignore[method-assign]
    py_peaks: list[tuple[str, float]] = []

    def on_round(record, _params, _state) -> None:
        marks["end"].append(time.perf_counter())

    try:
        server.pool.wait_for(clients, timeout=150.0)
        if use_tracemalloc:
            import tracemalloc

            tracemalloc.start(1)
        gc.collect()
        time.sleep(1.0)  # let the clients settle into their long-poll PullTask
        sampler = Sampler()
        sampler.start()
        time.sleep(0.2)
        baseline = rss_mb()
        hwm_before = rss_mb("VmHWM")
        if use_tracemalloc:
            tracemalloc.reset_peak()
            base_py = tracemalloc.get_traced_memory()[0]

            def traced_marked(results, inner=marked):
                tracemalloc.reset_peak()
                first = True
                for item in inner(results):
                    if first:
                        py_peaks.append(("dispatch", tracemalloc.get_traced_memory()[1] - base_py))
                        tracemalloc.reset_peak()
                        first = False
                    yield item
                    del item

            def aggregate_traced(parameters, state, results, **kwargs):
                marks["start"].append(time.perf_counter())
                tracemalloc.reset_peak()
                out = aggregate_fit(parameters, state, traced_marked(results), **kwargs)
                py_peaks.append(("collect", tracemalloc.get_traced_memory()[1] - base_py))
                return out

            strategy.aggregate_fit = aggregate_traced  # type: ignore[method-assign]
        if secure:
            marks["start"].append(time.perf_counter())
        handoff = [initial]
        del initial  # like a real server: nothing but the round loop keeps the initial model alive
        result = server.run(strategy, handoff.pop(), num_rounds=rounds, seed=0, on_round=on_round)
        time.sleep(0.1)
        sampler.stop()
        hwm_after = rss_mb("VmHWM")
        statuses = [(r.round, r.status, r.num_results, round(r.timings["total_s"], 2)) for r in result.history.rounds]
        phases = []
        for i in range(len(marks["first"])):
            phases.append({
                "dispatch": sampler.peak(marks["start"][i], marks["first"][i]) - baseline,
                "collect": sampler.peak(marks["first"][i], marks["end"][i]) - baseline,
                "dispatch_s": marks["first"][i] - marks["start"][i],
                "collect_s": marks["end"][i] - marks["first"][i],
            })
        run_peak = sampler.peak(marks["start"][0], marks["end"][-1])
        queue.put(("result", {
            "model_mb": model_mb, "baseline": baseline, "peak": run_peak, "hwm_before": hwm_before,
            "hwm_after": hwm_after, "rounds": statuses, "phases": phases, "py_peaks": py_peaks,
            "samples": len(sampler.samples), "top": _top(sampler.snapshot),
        }))
    except BaseException as error:  # report, never hang the parent
        queue.put(("error", f"{type(error).__name__}: {error}"))
        raise
    finally:
        server.stop(grace_s=10.0)


def _top(snapshot, limit: int = 12) -> list[str]:
    """The largest allocation sites of a tracemalloc snapshot, as lines."""
    if snapshot is None:
        return []
    stats = snapshot.statistics("lineno")
    total = sum(stat.size for stat in stats)
    lines = [f"traced total {total / 2**20:.0f} MiB at the largest sampled moment:"]
    for stat in stats[:limit]:
        frame = stat.traceback[0]
        path = "/".join(frame.filename.split("/")[-3:])
        lines.append(f"{stat.size / 2**20:8.1f} MiB in {stat.count:6d} blocks  {path}:{frame.lineno}")
    return lines


def clients_process(address: str, clients: int, values: int) -> None:
    import logging

    from insitu.client.api import EvalResult, FitResult
    from insitu.net.client import connect

    logging.basicConfig(level=logging.WARNING)
    fixed = make_parameters(values, seed=1)  # one object, returned by every client

    class FixedClient:
        def fit(self, parameters, config):
            return FitResult(fixed, 600, {})

        def evaluate(self, parameters, config):
            return EvalResult(0.0, 0, {})

    threads = [threading.Thread(target=connect, args=(FixedClient(), address),
                                kwargs={"client_id": str(i), "give_up_after_s": 60.0}, daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_with_clients(ctx, server, queue, clients_target, clients_args: tuple, timeout: float) -> dict:
    """With ``server`` started: wait for its port, start ``clients_target(address, *clients_args)`` in
    another process, return the server's result, and always reap both processes."""
    client_proc = None
    try:
        kind, port = queue.get(timeout=60)
        if kind != "port":
            raise RuntimeError(port)
        client_proc = ctx.Process(target=clients_target, args=(f"127.0.0.1:{port}", *clients_args), daemon=True)
        client_proc.start()
        kind, outcome = queue.get(timeout=timeout)
        if kind != "result":
            raise RuntimeError(f"server failed: {outcome}")
        return outcome
    finally:
        for proc in (server, client_proc):
            if proc is not None:
                proc.join(timeout=20)
                if proc.is_alive():
                    proc.terminate()
                    proc.join(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--values", type=int, default=10_000_000, help="float32 values in the model")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tracemalloc", action="store_true", help="also trace Python-visible allocations")
    parser.add_argument("--timeout", type=float, default=170.0)
    parser.add_argument("--secure", action="store_true", help="rounds with secure aggregation")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="diagnostic: run the server with MALLOC_MMAP_THRESHOLD_=N (glibc), so freed large "
                             "buffers go back to the OS instead of staying in malloc's heaps")
    parser.add_argument("--grpc-option", action="append", default=[], metavar="KEY=INT",
                        help="diagnostic: extra gRPC option for the server, e.g. grpc.http2.bdp_probe=0")
    args = parser.parse_args()
    grpc_options = [(k, int(v)) for k, v in (o.split("=", 1) for o in args.grpc_option)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    server = ctx.Process(target=server_process,
                         args=(queue, args.clients, args.values, args.rounds, args.tracemalloc, grpc_options,
                               args.secure))
    if args.mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    try:
        server.start()
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    outcome = run_with_clients(ctx, server, queue, clients_process, (args.clients, args.values), args.timeout)
    m = outcome["model_mb"]
    grow = outcome["peak"] - outcome["baseline"]
    extra = (f"; server MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else "") + (
        f"; server gRPC options {grpc_options}" if grpc_options else "")
    extra += "; secure aggregation" if args.secure else ""
    print(f"server process{extra}, {args.clients} clients, model {args.values:,} float32 = {m:.1f} MiB, "
          f"{args.rounds} rounds: {outcome['rounds']}  (round, status, results, seconds)")
    print(f"baseline RSS {outcome['baseline']:.0f} MiB (initial parameters built, {args.clients} clients connected); "
          f"peak during the rounds {outcome['peak']:.0f} MiB ({outcome['samples']} samples at 5 ms)")
    print(f"VmHWM before the rounds {outcome['hwm_before']:.0f} MiB, after {outcome['hwm_after']:.0f} MiB "
          f"(-> peak - baseline by VmHWM {outcome['hwm_after'] - outcome['baseline']:.0f} MiB)")
    for i, phase in enumerate(outcome["phases"], 1):
        print(f"  round {i}: dispatch {phase['dispatch_s']:.1f} s, peak +{phase['dispatch']:.0f} MiB "
              f"({phase['dispatch'] / m:.2f}x model) | collect {phase['collect_s']:.1f} s, peak +{phase['collect']:.0f} MiB "
              f"({phase['collect'] / m:.2f}x model)")
    if outcome["py_peaks"]:
        print("  tracemalloc (Python-visible: numpy, bytes, protobuf messages), peak over baseline: "
              + ", ".join(f"{name} +{mb / 2**20:.0f} MiB" for name, mb in outcome["py_peaks"]))
    for line in outcome["top"]:
        print("    " + line)
    multiple = grow / m
    print(f"peak - baseline = {grow:.0f} MiB = {multiple:.2f}x the model "
          f"(target < {TARGET_MULTIPLE:.0f}x: {'met' if multiple < TARGET_MULTIPLE else 'NOT met'})")


if __name__ == "__main__":
    main()
