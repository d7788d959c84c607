"""Benchmark (not a test): stalling insiders among honest clients — server memory and round time.

Two runs of the same federation, each in fresh processes: a plaintext loopback FedAvg server in
its own process (so only its memory is counted) and all clients as threads of a second process.

- **honest**: ``--clients`` honest clients (default 20), each returning one shared precomputed
  model with 600 examples.
- **hostile**: the same number of clients, ``--stallers`` of them (default 3) authenticated
  insiders that answer every fit task by opening their upload, sending the header and the first
  128 KiB chunk, and then staying silent with the stream open (each holds a decode slot until the
  server's stall limit cancels it).

Per round the server records (by wrapping its pool, nothing else changes):
- **honest folded**: from dispatch until the last honest result was handed to the round loop;
- **round**: the round's ``total_s`` (it also waits for the stallers' tasks, which end when the
  stall limit ``--upload-stall`` cancels them);
- server RSS: peak over the baseline taken once all clients are connected (sampled every 5 ms).

    nice -n 10 python bench/hostile_insiders.py [--clients 20] [--stallers 3] [--values 2000000]
                                                [--rounds 3] [--upload-stall 3] [--upload-slots 4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_memory import (  # the bench folder is no package
    Sampler,
    make_parameters,
    rss_mb,
    run_with_clients,
)

TARGET_RATIO = 1.2


def server_process(queue, clients: int, values: int, rounds: int, stall_s: float, slots: int) -> None:
    import logging

    from insitu.net.server import FederationServer, ServerSettings
    from insitu.protocols.envelope import Envelope
    from insitu.strategies import fedavg

    logging.basicConfig(level=logging.ERROR)
    initial = make_parameters(values, seed=0)
    model_mb = initial.flat().nbytes / 2**20
    server = FederationServer(ServerSettings(address="127.0.0.1:0", insecure=True, round_timeout_s=600.0,
                                             heartbeat_timeout_s=120.0, max_clients=clients + 8,
                                             upload_stall_s=stall_s, upload_slots=slots))
    queue.put(("port", server.port))
    pool = server.pool
    starts: list[float] = []
    folded: list[float] = []
    submit, deliver = pool.submit, pool.deliver

    def timed_submit(kind, parameters, model_version, tasks):
        if kind == "fit":
            starts.append(time.perf_counter())
            folded.append(float("nan"))
        return submit(kind, parameters, model_version, tasks)

    def timed_deliver(task, outcome, wait_consumed=None):
        if isinstance(outcome, Envelope) and outcome.protocol == "fit" and starts:
            folded[-1] = time.perf_counter() - starts[-1]
        return deliver(task, outcome, wait_consumed)

    pool.submit, pool.deliver = timed_submit, timed_deliver  # type: ignore[method-assign]
    strategy = fedavg(min_fit_clients=1, min_available_clients=clients, fraction_evaluate=0.0)
    try:
        pool.wait_for(clients, timeout=150.0)
        time.sleep(1.0)
        sampler = Sampler()
        sampler.start()
        time.sleep(0.2)
        baseline = rss_mb()
        start = time.perf_counter()
        handoff = [initial]
        del initial
        ends: list[float] = []
        result = server.run(strategy, handoff.pop(), num_rounds=rounds, seed=0,
                            on_round=lambda *_: ends.append(time.perf_counter()))
        sampler.stop()
        peak = sampler.peak(start, time.perf_counter())
        per_round = [sampler.peak(a, b) - baseline for a, b in zip(starts, ends)]
        queue.put(("result", {
            "model_mb": model_mb, "growth": peak - baseline, "per_round": per_round,
            "rounds": [(r.status, r.num_results, r.timings["total_s"], len(r.failures))
                       for r in result.history.rounds],
            "folded": folded,
        }))
    except BaseException as error:  # report, never hang the parent
        queue.put(("error", f"{type(error).__name__}: {error}"))
        raise
    finally:
        server.stop(grace_s=10.0)


def clients_process(address: str, clients: int, stallers: int, values: int) -> None:
    import logging

    import grpc

    from insitu import serde
    from insitu.client.api import EvalResult, FitResult
    from insitu.net.client import connect
    from insitu.net.proto import federation_pb2 as pb
    from insitu.net.proto import federation_pb2_grpc as pb_grpc
    from insitu.net.servicer import CHUNK_SIZE, PROTOCOL_VERSIONS, SESSION_METADATA

    logging.basicConfig(level=logging.ERROR)
    fixed = make_parameters(values, seed=1)
    first_chunk = next(serde.iter_chunks(fixed, CHUNK_SIZE))
    size = serde.encoded_size(fixed)

    class FixedClient:
        def fit(self, parameters, config):
            return FitResult(fixed, 600, {})

        def evaluate(self, parameters, config):
            return EvalResult(0.0, 0, {})

    def staller(client_id: str) -> None:
        stub = pb_grpc.FederationStub(grpc.insecure_channel(address))
        hello = stub.Hello(pb.HelloRequest(protocol_versions=list(PROTOCOL_VERSIONS), client_id=client_id))
        token = stub.Authenticate(pb.AuthRequest(client_id=client_id, nonce=hello.nonce)).session_token
        meta = ((SESSION_METADATA, token),)
        forever = threading.Event()
        while True:
            messages = list(stub.PullTask(pb.PullRequest(session_token=token, wait_s=5.0), metadata=meta))
            body = messages[0].WhichOneof("body")
            if body == "shutdown":
                return
            if body != "header":
                continue
            task_id = messages[0].header.task_id

            def upload(task_id: str = task_id):
                yield pb.ResultMessage(header=pb.Envelope(session_token=token, task_id=task_id, num_examples=600,
                                                          payload_bytes=size))
                yield pb.ResultMessage(chunk=bytes(first_chunk))
                forever.wait()  # silent, stream open

            try:
                stub.PushResult(upload(), metadata=meta)
            except grpc.RpcError:
                pass  # cancelled by the server's stall limit

    threads = [threading.Thread(target=staller, args=(f"s{i}",), daemon=True) for i in range(stallers)]
    threads += [threading.Thread(target=connect, args=(FixedClient(), address),
                                 kwargs={"client_id": str(i), "give_up_after_s": 60.0}, daemon=True)
                for i in range(clients - stallers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run(clients: int, stallers: int, values: int, rounds: int, stall_s: float, slots: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    server = ctx.Process(target=server_process, args=(queue, clients, values, rounds, stall_s, slots))
    server.start()
    return run_with_clients(ctx, server, queue, clients_process, (clients, stallers, values),
                            timeout=300 + rounds * (stall_s + 60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--stallers", type=int, default=3)
    parser.add_argument("--values", type=int, default=2_000_000, help="float32 values in the model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upload-stall", type=float, default=3.0, help="the server's upload stall limit, s")
    parser.add_argument("--upload-slots", type=int, default=4)
    args = parser.parse_args()
    runs = {}
    for name, stallers in (("honest", 0), ("hostile", args.stallers)):
        runs[name] = run(args.clients, stallers, args.values, args.rounds, args.upload_stall, args.upload_slots)
    model_mb = runs["honest"]["model_mb"]
    print(f"{args.clients} clients, model {args.values:,} float32 = {model_mb:.1f} MiB, {args.upload_slots} upload "
          f"slots, stall limit {args.upload_stall:g} s, {args.rounds} rounds; hostile run: {args.stallers} stallers")
    print("| run | round | status | results | failures | honest folded s | round s | server RSS peak over baseline |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, out in runs.items():
        rows = zip(out["rounds"], out["folded"], out["per_round"])
        for i, ((status, results, total, failures), folded, growth) in enumerate(rows, 1):
            print(f"| {name} | {i} | {status} | {results} | {failures} | {folded:.2f} | {total:.2f} | "
                  f"+{growth:.0f} MiB ({growth / model_mb:.1f}x model) |")
    honest = [f for f in runs["honest"]["folded"][1:]] or runs["honest"]["folded"]
    hostile = [f for f in runs["hostile"]["folded"][1:]] or runs["hostile"]["folded"]
    h, x = sum(honest) / len(honest), sum(hostile) / len(hostile)
    rounds_h = [r[2] for r in runs["honest"]["rounds"][1:]] or [r[2] for r in runs["honest"]["rounds"]]
    rounds_x = [r[2] for r in runs["hostile"]["rounds"][1:]] or [r[2] for r in runs["hostile"]["rounds"]]
    rh, rx = sum(rounds_h) / len(rounds_h), sum(rounds_x) / len(rounds_x)
    ratio = x / h
    print(f"rounds 2..{args.rounds} (round 1 warms up): honest results folded after {h:.2f} s (honest run) vs "
          f"{x:.2f} s (with stallers): ratio {ratio:.2f} (target <= {TARGET_RATIO}: "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'})")
    print(f"round time {rh:.2f} s vs {rx:.2f} s: the hostile round also waits for the stall limit "
          f"({args.upload_stall:g} s), after which the stallers' tasks fail; "
          f"({rx:.2f} - {args.upload_stall:g}) / {rh:.2f} = {(rx - args.upload_stall) / rh:.2f}")


if __name__ == "__main__":
    main()
