"""Hostile clients against a real server on loopback (issue 11, part B).

Threat model: an insider holds a valid key (it authenticates) and sends whatever the protocol lets
it send; an outsider holds nothing, or a stolen TLS certificate without its signing key. For each
attack: the server stays up, the honest clients finish every round, the log and the round record
name the client and the reason, and the server's Python-visible memory stays bounded (tracemalloc
peak; gRPC core's own buffers are measured by bench/hostile_insiders.py).
"""

from __future__ import annotations

import logging
import threading
import time
import tracemalloc

import grpc
import numpy as np
import pytest
from net_harness import Federation, ValueClient, auth, raw_session, stub_for

from insitu import serde
from insitu.net import security
from insitu.net.client import ClientTLS
from insitu.net.proto import federation_pb2 as pb
from insitu.net.proto import federation_pb2_grpc as pb_grpc
from insitu.net.server import ServerTLS
from insitu.net.servicer import CHUNK_SIZE
from insitu.params import Parameters
from insitu.strategies import fedavg

VALUES = 1 << 16  # a 256 KiB model: large enough that per-model buffers show in the memory peak
MODEL = Parameters.from_arrays({"w": np.zeros(VALUES, np.float32)})
MODEL_BYTES = VALUES * 4
# Python-visible allocations of the whole test process (server, honest clients, attacker) while the
# rounds run: measured 2.5-6.2 MiB across these tests (2026-12-01), so 16 MiB leaves room for noise yet
# fails an attack that gets a buffer sized by what it declares (the junk extra declares 256 MiB) or
# holds more than a few models per upload.
MEMORY_BOUND = 16 << 20


@pytest.fixture
def peak_memory():
    """Peak of Python-visible allocations during the test, in bytes."""
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def honest(value, n=10, delay=0.0):
    return ValueClient(np.full(VALUES, value, np.float32), n=n, delay=delay)


def federation(num_rounds=2, min_fit=2, available=3, **settings):
    settings.setdefault("round_timeout_s", 20.0)
    return Federation(num_rounds=num_rounds, initial=MODEL, **settings,
                      strategy=fedavg(min_fit_clients=min_fit, min_available_clients=available, fraction_evaluate=0.0))


def assert_named(caplog, client_id, words):
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(client_id in line and words in line for line in lines), lines


class RawInsider(threading.Thread):
    """An authenticated client that answers each fit task with ``push(stub, token, header)``."""

    def __init__(self, address, client_id, push):
        super().__init__(daemon=True)
        self.address, self.client_id, self.push = address, client_id, push
        self.replies, self.errors = [], []
        self.start()

    def run(self):
        stub = stub_for(self.address)
        token = raw_session(stub, self.client_id)
        while True:
            try:
                messages = list(stub.PullTask(pb.PullRequest(session_token=token, wait_s=0.5), metadata=auth(token)))
            except grpc.RpcError:  # the server has gone (its run ended while this insider stalled)
                return
            body = messages[0].WhichOneof("body")
            if body == "shutdown":
                return
            if body == "header":
                try:
                    self.replies.append(self.push(stub, token, messages[0].header))
                except grpc.RpcError as error:
                    self.errors.append(error)


def result_header(token, task, n=10, payload_bytes=0, extras=()):
    return pb.ResultMessage(header=pb.Envelope(session_token=token, task_id=task.task_id, num_examples=n,
                                               payload_bytes=payload_bytes, extras=list(extras)))


def chunks_of(data):
    for start in range(0, len(data), CHUNK_SIZE):
        yield pb.ResultMessage(chunk=data[start : start + CHUNK_SIZE])


# -- B1: absurd magnitudes -------------------------------------------------------------------------
def test_finite_but_huge_weights_are_rejected_and_never_committed(tmp_path, caplog, peak_memory):
    fed = federation(store_path=tmp_path / "server.db")
    fed.add(honest(1.0), "0")
    fed.add(honest(3.0), "1")
    fed.add(ValueClient(np.full(VALUES, 1e38, np.float32), n=100), "evil")
    result = fed.finish()
    for record in result.history.rounds:
        assert record.status == "ok" and record.num_results == 2
        [failure] = record.failures
        assert failure["client"] == "evil" and "above the bound" in failure["reason"]
    assert np.array_equal(dict(result.parameters)["w"], np.full(VALUES, 2.0, np.float32))
    assert_named(caplog, "evil", "above the bound")
    assert peak_memory() < MEMORY_BOUND


def test_an_aggregate_that_overflows_fails_the_round_and_leaves_the_model(caplog):
    # Each update is within the bound (1e6 x the global's largest value, 1e32) but their float32
    # sum is not finite: the final check fails the round instead of committing +inf.
    initial = Parameters.from_arrays({"w": np.array([1e32, 0, 0], np.float32)})
    fed = Federation(num_rounds=1, initial=initial,
                     strategy=fedavg(min_fit_clients=2, min_available_clients=2, fraction_evaluate=0.0))
    fed.add(ValueClient([1e38, 1e38, 1e38], n=10), "0")
    fed.add(ValueClient([1e38, 1e38, 1e38], n=10), "1")
    result = fed.finish()
    [record] = result.history.rounds
    assert record.status == "failed" and "aggregation refused" in record.error and "NaN or Inf" in record.error
    assert result.parameters == initial
    assert any("aggregation refused" in r.getMessage() for r in caplog.records)


# -- B2: claimed example counts ---------------------------------------------------------------------
def test_a_claimed_example_count_counts_at_most_the_cap(caplog, peak_memory):
    fed = federation(num_rounds=1, max_examples_per_client=20)
    fed.add(honest(1.0, n=10), "0")
    fed.add(honest(3.0, n=10), "1")
    fed.add(ValueClient(np.full(VALUES, 100.0, np.float32), n=2**63), "liar")
    result = fed.finish()
    [record] = result.history.rounds
    assert record.status == "ok" and record.num_results == 3
    assert record.clients["liar"]["num_examples"] == 20
    expected = (10 * 1.0 + 10 * 3.0 + 20 * 100.0) / 40  # the liar weighs 20, not 2^63
    assert np.allclose(dict(result.parameters)["w"], expected)
    assert_named(caplog, "liar", "claimed 9223372036854775808 examples; counted as 20")
    assert peak_memory() < MEMORY_BOUND


def test_from_round_two_a_count_weighs_at_most_ten_times_the_previous_median(caplog, peak_memory):
    # The absolute cap (10^6 here) alone lets a client claiming 1000 dominate clients of 10; from
    # round 2 its weight is also bounded by 10 x the median of round 1's counts [10, 10, 1000] = 100.
    fed = federation(num_rounds=2, min_fit=3, max_examples_per_client=10**6)
    fed.add(honest(1.0, n=10), "0")
    fed.add(honest(3.0, n=10), "1")
    fed.add(ValueClient(np.full(VALUES, 100.0, np.float32), n=1000), "liar")
    result = fed.finish()
    first, second = result.history.rounds
    assert first.clients["liar"]["num_examples"] == 1000 and second.clients["liar"]["num_examples"] == 100
    assert np.allclose(dict(result.parameters)["w"], (10 * 1.0 + 10 * 3.0 + 100 * 100.0) / 120)
    assert first.clients["0"]["num_examples"] == second.clients["0"]["num_examples"] == 10
    assert_named(caplog, "liar", "claimed 1000 examples; counted as 100 (max_examples_ratio 10 x the previous round's "
                                 "median count 10)")
    assert peak_memory() < MEMORY_BOUND


# -- B3: stalled uploads ----------------------------------------------------------------------------
def stall_after_first_chunk(release):
    def push(stub, token, task):
        data = serde.dumps(MODEL)

        def messages():
            yield result_header(token, task, payload_bytes=len(data))
            yield pb.ResultMessage(chunk=data[:CHUNK_SIZE])  # then silence, holding the stream open
            release.wait()

        return stub.PushResult(messages(), metadata=auth(token))

    return push


def test_a_stalled_upload_is_cancelled_and_blocks_no_one(caplog, peak_memory):
    release = threading.Event()
    fed = federation(upload_slots=1, upload_stall_s=1.0, round_timeout_s=15.0)
    staller = RawInsider(fed.address, "staller", stall_after_first_chunk(release))
    fed.add(honest(1.0), "0")
    fed.add(honest(3.0), "1")
    try:
        result = fed.finish()
    finally:
        release.set()
    for record in result.history.rounds:
        assert record.status == "ok" and record.num_results == 2
        [failure] = record.failures
        assert failure["client"] == "staller" and "stalled" in failure["reason"]
    assert np.allclose(dict(result.parameters)["w"], 2.0)
    assert len(staller.errors) == 2 and all(e.code() == grpc.StatusCode.CANCELLED for e in staller.errors)
    assert_named(caplog, "staller", "stalled: no data for 1 s")
    assert peak_memory() < MEMORY_BOUND


def test_a_stalled_upload_does_not_hold_back_the_others_while_it_stalls(caplog):
    # The stall limit (60 s) is beyond the round deadline (6 s): the honest uploads must pass while
    # the staller still holds its slot (a second slot opens once it has been silent for 0.05 s).
    release = threading.Event()
    fed = federation(num_rounds=1, upload_slots=2, upload_stall_s=60.0, round_timeout_s=6.0)
    RawInsider(fed.address, "staller", stall_after_first_chunk(release))
    fed.add(honest(1.0, delay=1.0), "0")  # they train for 1 s: the staller holds its slot by then
    fed.add(honest(3.0, delay=1.0), "1")
    try:
        [record] = fed.finish().history.rounds
    finally:
        release.set()
    assert record.status == "ok" and record.num_results == 2
    [failure] = record.failures
    assert failure["client"] == "staller" and "round deadline" in failure["reason"]


def drip(size, pause):
    """An insider that uploads its model ``size`` bytes at a time, ``pause`` seconds apart."""

    def push(stub, token, task):
        data = serde.dumps(MODEL)

        def messages():
            yield result_header(token, task, payload_bytes=len(data))
            for start in range(0, len(data), size):
                yield pb.ResultMessage(chunk=data[start : start + size])
                time.sleep(pause)

        return stub.PushResult(messages(), metadata=auth(token))

    return push


def test_a_slow_drip_upload_is_cancelled_at_the_upload_time_limit(caplog, peak_memory):
    fed = federation(num_rounds=1, upload_stall_s=2.0, upload_timeout_s=1.0)
    dripper = RawInsider(fed.address, "dripper", drip(1024, 0.1))  # never silent for the stall limit
    fed.add(honest(1.0), "0")
    fed.add(honest(3.0), "1")
    [record] = fed.finish().history.rounds
    assert record.status == "ok" and record.num_results == 2
    [failure] = record.failures
    assert failure["client"] == "dripper" and "not received within the upload time limit of 1 s" in failure["reason"]
    assert dripper.errors and dripper.errors[0].code() == grpc.StatusCode.CANCELLED
    assert_named(caplog, "dripper", "too slow")
    assert peak_memory() < MEMORY_BOUND


def test_a_fast_drip_that_is_never_silent_does_not_hold_back_the_others(caplog, peak_memory):
    # Stall limit 30 s: the dripper keeps its slot past the 6 s round deadline, so the honest uploads
    # arrive in time only if a slot opens beside an upload slower than SLOT_YIELD_RATE.
    fed = federation(num_rounds=1, upload_stall_s=30.0, round_timeout_s=6.0)
    RawInsider(fed.address, "dripper", drip(64, 0.02))  # never silent for the 50 ms slot grace
    fed.add(honest(1.0, delay=1.0), "0")  # they train for 1 s: the dripper holds the first slot by then
    fed.add(honest(3.0, delay=1.0), "1")
    [record] = fed.finish().history.rounds
    assert record.status == "ok" and record.num_results == 2, record.error
    assert [f["client"] for f in record.failures] == ["dripper"]
    assert_named(caplog, "dripper", "fit failed")
    assert peak_memory() < MEMORY_BOUND


def test_one_upload_per_client_at_a_time(caplog, peak_memory):
    release = threading.Event()
    second = []

    def stall(stub, token, task):
        try:
            stall_after_first_chunk(release)(stub, token, task)
        except grpc.RpcError:  # how this one ends does not matter here
            pass

    def push_twice(stub, token, task):
        first = threading.Thread(target=stall, args=(stub, token, task), daemon=True)
        first.start()
        time.sleep(0.3)
        try:
            stub.PushResult(iter([result_header(token, task)]), metadata=auth(token))
        except grpc.RpcError as error:
            second.append(error)
        release.set()
        first.join(10)

    fed = federation(num_rounds=1, upload_stall_s=5.0)
    RawInsider(fed.address, "twice", push_twice)
    fed.add(honest(1.0), "0")
    fed.add(honest(3.0), "1")
    [record] = fed.finish().history.rounds
    assert record.status == "ok" and record.num_results == 2
    assert second and second[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "one at a time" in second[0].details()
    assert_named(caplog, "twice", "another of its uploads is in progress")
    assert peak_memory() < MEMORY_BOUND


# -- B4: streams opened without credentials -----------------------------------------------------------
def silent(release):
    """A request stream that sends nothing until ``release`` is set."""
    release.wait()
    return
    yield


def open_idle_uploads(address, count, metadata=None):
    """``count`` PushResult streams that send nothing until ``release`` is set."""
    release = threading.Event()
    stub = stub_for(address)
    return release, [stub.PushResult.future(silent(release), metadata=metadata) for _ in range(count)]


def test_unauthenticated_streams_hold_no_server_threads(caplog, peak_memory):
    # max_clients=8: the server has 8 * 2 + 8 = 24 handler threads; 60 idle streams would take them all.
    fed = federation(num_rounds=2, available=2, max_clients=8)
    release, calls = open_idle_uploads(fed.address, 60)
    forged_release, forged = open_idle_uploads(fed.address, 20, metadata=auth("forged-token"))
    try:
        for call in calls + forged:
            assert call.exception(timeout=10).code() == grpc.StatusCode.UNAUTHENTICATED
        fed.add(honest(1.0), "0")
        fed.add(honest(3.0), "1")
        result = fed.finish(timeout=60)
    finally:
        release.set()
        forged_release.set()
    assert [r.status for r in result.history.rounds] == ["ok", "ok"]
    assert "no valid session" in calls[0].exception().details()
    assert any("without a valid session token" in r.getMessage() for r in caplog.records)
    assert peak_memory() < MEMORY_BOUND


def test_an_authenticated_idle_upload_is_cancelled_after_the_stall_limit(caplog, peak_memory):
    fed = federation(num_rounds=1, available=2, upload_stall_s=0.5)
    stub = stub_for(fed.address)
    token = raw_session(stub, "idler")
    release, [call] = open_idle_uploads(fed.address, 1, metadata=auth(token))
    try:
        assert call.exception(timeout=10).code() == grpc.StatusCode.CANCELLED
    finally:
        release.set()
    stub.Leave(pb.LeaveRequest(session_token=token))  # so the round does not wait for it
    fed.add(honest(1.0), "0")
    fed.add(honest(3.0), "1")
    fed.finish()
    assert_named(caplog, "idler", "ended before its header: stalled")
    assert peak_memory() < MEMORY_BOUND


def test_calls_that_never_send_their_request_are_cut_off_and_capped_per_host(caplog, peak_memory):
    # Hello, Heartbeat and PullTask take one request: a peer that opens the call and never sends it
    # held a handler thread for good. Now the request must arrive within the stall limit, and one
    # host may have 4 (here) calls waiting; once they are cut off, honest clients get through.
    fed = federation(num_rounds=1, available=2, max_clients=8, upload_stall_s=0.5)
    fed.server.servicer.gate.per_host = 4
    token = raw_session(stub_for(fed.address), "insider")
    channel = grpc.insecure_channel(fed.address)
    hello = channel.stream_unary("/insitu.v1.Federation/Hello", request_serializer=pb.HelloRequest.SerializeToString,
                                 response_deserializer=pb.HelloReply.FromString)
    beat = channel.stream_unary("/insitu.v1.Federation/Heartbeat",
                                request_serializer=pb.HeartbeatRequest.SerializeToString,
                                response_deserializer=pb.HeartbeatReply.FromString)
    pull = channel.stream_stream("/insitu.v1.Federation/PullTask",
                                 request_serializer=pb.PullRequest.SerializeToString,
                                 response_deserializer=pb.TaskMessage.FromString)
    release = threading.Event()
    calls = [hello.future(silent(release)) for _ in range(40)]
    calls += [beat.future(silent(release)) for _ in range(10)]
    pulls = [pull(silent(release), metadata=auth(token), timeout=20) for _ in range(10)]
    try:
        codes = {call.exception(timeout=30).code() for call in calls}
        for stream in pulls:
            with pytest.raises(grpc.RpcError) as info:
                list(stream)
            codes.add(info.value.code())
        # the insider leaves before the honest clients join: were it still connected when the round
        # starts, it would be sampled and its never-pulled task would fail the round
        stub_for(fed.address).Leave(pb.LeaveRequest(session_token=token))
        fed.add(honest(1.0), "0")
        fed.add(honest(3.0), "1")
        [record] = fed.finish(timeout=60).history.rounds
    finally:
        release.set()
    assert codes == {grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert record.status == "ok" and record.num_results == 2
    notes = [r.getMessage() for r in caplog.records if "unauthenticated call(s)" in r.getMessage()]
    assert any("waiting for their request" in n or "without a request" in n for n in notes), notes
    assert peak_memory() < MEMORY_BOUND


def test_a_session_has_at_most_two_pulls_waiting(caplog, peak_memory):
    fed = federation(num_rounds=1, available=2)
    stub = stub_for(fed.address)
    token = raw_session(stub, "puller")
    request = pb.PullRequest(session_token=token, wait_s=3.0)
    waiting = [stub.PullTask(request, metadata=auth(token)) for _ in range(2)]
    pulls = fed.server.servicer._pulls
    for _ in range(200):  # until both long polls are in the server
        if pulls.get(token) == 2:
            break
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.PullTask(request, metadata=auth(token)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 2 pulls" in info.value.details()
    assert [m.WhichOneof("body") for w in waiting for m in w] == ["idle", "idle"]  # the first two are served
    for _ in range(200):  # both are counted out once their calls have ended
        if token not in pulls:
            break
        time.sleep(0.05)
    assert token not in pulls
    stub.Leave(pb.LeaveRequest(session_token=token))
    fed.add(honest(1.0), "0")
    fed.add(honest(3.0), "1")
    [record] = fed.finish().history.rounds
    assert record.status == "ok" and record.num_results == 2
    assert_named(caplog, "puller", "2 of its pulls are waiting already")
    assert peak_memory() < MEMORY_BOUND


# -- B5: a stream that breaks mid-upload ------------------------------------------------------------
def test_a_broken_upload_fails_its_task_at_once(caplog, peak_memory):
    def break_midway(stub, token, task):
        data = serde.dumps(MODEL)

        def messages():
            yield result_header(token, task, payload_bytes=len(data))
            yield pb.ResultMessage(chunk=data[:CHUNK_SIZE])
            raise RuntimeError("client crashed mid-upload")  # gRPC cancels the call

        return stub.PushResult(messages(), metadata=auth(token))

    # The round deadline (300 s) is far beyond finish()'s patience: only a failure reported at
    # once lets the round end.
    fed = federation(round_timeout_s=300.0)
    RawInsider(fed.address, "crash", break_midway)
    fed.add(honest(1.0), "0")
    fed.add(honest(3.0), "1")
    result = fed.finish(timeout=40)
    for record in result.history.rounds:
        assert record.status == "ok" and record.num_results == 2
        [failure] = record.failures
        assert failure["client"] == "crash" and "the stream broke off after" in failure["reason"]
    assert_named(caplog, "crash", "stream broke off")
    assert peak_memory() < MEMORY_BOUND


# -- B9: uploads larger than the model needs ---------------------------------------------------------
JUNK_BYTES = 256 << 20


def junk_extra(name):
    """A valid update plus an extra ``name`` declaring a 256 MiB array (streamed lazily if asked for)."""
    def push(stub, token, task):
        data = serde.dumps(Parameters.from_arrays({"w": np.full(VALUES, 5.0, np.float32)}))
        head, _ = serde._preamble([("junk", np.dtype(np.uint8), (JUNK_BYTES,))])
        extra = pb.Extra(name=name, payload_bytes=len(head) + JUNK_BYTES)

        def messages():
            yield result_header(token, task, payload_bytes=len(data), extras=[extra])
            yield from chunks_of(data)
            yield pb.ResultMessage(chunk=head)
            zeros = bytes(CHUNK_SIZE)
            for _ in range(JUNK_BYTES // CHUNK_SIZE):
                yield pb.ResultMessage(chunk=zeros)

        return stub.PushResult(messages(), metadata=auth(token))

    return push


def test_extras_beyond_what_the_algorithm_returns_are_refused(caplog, peak_memory):
    fed = federation(num_rounds=1, available=4)
    junk = RawInsider(fed.address, "junk", junk_extra("junk"))
    big = RawInsider(fed.address, "bigc", junk_extra("scaffold_delta_c"))
    fed.add(honest(1.0), "0")
    fed.add(honest(3.0), "1")
    [record] = fed.finish().history.rounds
    assert record.status == "ok" and record.num_results == 2
    reasons = {f["client"]: f["reason"] for f in record.failures}
    assert "is not a result this task's client algorithm returns" in reasons["junk"]
    # a FedAvg task accepts no extras at all: SCAFFOLD's is refused by name before its size matters
    assert "extra 'scaffold_delta_c' (268435532 bytes) is not a result this task's" in reasons["bigc"]
    assert not junk.replies[0].accepted and not big.replies[0].accepted
    assert_named(caplog, "junk", "extra 'junk'")
    assert_named(caplog, "bigc", "extra 'scaffold_delta_c'")
    assert peak_memory() < MEMORY_BOUND


def smuggle_protocol_bytes(stub, token, task):
    """A valid update plus 256 MiB of opaque protocol bytes that a fit task never asks for."""
    data = serde.dumps(Parameters.from_arrays({"w": np.full(VALUES, 5.0, np.float32)}))

    def messages():
        yield pb.ResultMessage(header=pb.Envelope(session_token=token, task_id=task.task_id, num_examples=10,
                                                  payload_bytes=len(data), message_bytes=JUNK_BYTES))
        yield from chunks_of(data)
        zeros = bytes(CHUNK_SIZE)
        for _ in range(JUNK_BYTES // CHUNK_SIZE):
            yield pb.ResultMessage(chunk=zeros)

    return stub.PushResult(messages(), metadata=auth(token))


def test_protocol_bytes_a_task_did_not_ask_for_are_refused_from_the_header(caplog, peak_memory):
    fed = federation(num_rounds=1, available=3)
    smuggler = RawInsider(fed.address, "smuggler", smuggle_protocol_bytes)
    fed.add(honest(1.0), "0")
    fed.add(honest(3.0), "1")
    [record] = fed.finish().history.rounds
    assert record.status == "ok" and record.num_results == 2
    reasons = {f["client"]: f["reason"] for f in record.failures}
    assert f"a protocol message of {JUNK_BYTES} bytes exceeds the 0 bytes" in reasons["smuggler"]
    assert not smuggler.replies[0].accepted
    assert_named(caplog, "smuggler", "protocol message")
    assert peak_memory() < MEMORY_BOUND


def test_streams_with_a_stolen_tls_certificate_but_no_key_hold_no_threads(tmp_path, caplog, peak_memory):
    # mTLS lets the thief's connection in; without the signing key it has no session, so its 450
    # idle upload streams are refused at once and the allow-listed clients (TLS + keys) finish.
    files = security.generate_federation(tmp_path / "fed", ["0", "1", "thief"])
    fed = Federation(num_rounds=1, initial=MODEL, insecure=False, max_clients=8,
                     tls=ServerTLS(files.server_cert, files.server_key, files.ca_cert),
                     allow_list=security.load_allow_list(files.allow_list),
                     strategy=fedavg(min_fit_clients=2, min_available_clients=2, fraction_evaluate=0.0))
    stolen = files.clients["thief"]
    creds = security.channel_credentials(stolen.ca_cert, stolen.tls_cert, stolen.tls_key)
    stub = pb_grpc.FederationStub(grpc.secure_channel(fed.address, creds))
    release = threading.Event()
    calls = [stub.PushResult.future(silent(release)) for _ in range(450)]
    try:
        for call in calls:
            assert call.exception(timeout=30).code() == grpc.StatusCode.UNAUTHENTICATED
        for cid, value in (("0", 1.0), ("1", 3.0)):
            c = files.clients[cid]
            fed.add(honest(value), cid, signing_key=c.signing_key, tls=ClientTLS(c.ca_cert, c.tls_cert, c.tls_key))
        [record] = fed.finish(timeout=120).history.rounds
    finally:
        release.set()
    assert record.status == "ok" and record.num_results == 2
    assert any("without a valid session token" in r.getMessage() for r in caplog.records)
    assert peak_memory() < MEMORY_BOUND
