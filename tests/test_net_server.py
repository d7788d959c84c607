"""The gRPC deployment in one process: real server, real sockets on loopback, client threads.

Covers the protocol paths that need no OS-level process control: aggregation through the network,
bad updates, protocol versions, sessions, authentication, deadlines, late joiners, resume.
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest
from net_harness import (
    GLOBAL,
    Federation,
    ValueClient,
    auth,
    pull,
    raw_session,
    stub_for,
)

from insitu import serde
from insitu.client.api import FitResult
from insitu.net import security
from insitu.net.client import ConnectionRefused, connect
from insitu.net.proto import federation_pb2 as pb
from insitu.net.server import FederationServer, ResumeError, ServerSettings
from insitu.net.servicer import PROTOCOL_VERSIONS
from insitu.params import Parameters
from insitu.strategies import fedavg


def test_fedavg_through_the_network_matches_hand_computation():
    fed = Federation(num_rounds=2, strategy=fedavg(min_fit_clients=2, min_available_clients=2, fraction_evaluate=1.0,
                                                   fit_config=lambda r: {"lr": 0.1 * r}))
    a, b = ValueClient([1, 2, 3], n=1), ValueClient([5, 6, 7], n=3)
    fed.add(a, "0")
    fed.add(b, "1")
    result = fed.finish()
    assert np.allclose(dict(result.parameters)["w"], [4, 5, 6])
    record = result.history.rounds[1]
    assert record.num_results == 2 and record.failures == []
    assert record.federated.loss == pytest.approx((1 * 1 + 3 * 3) / 4)
    assert record.clients["0"]["seen"] == 4.0  # round 2 received round 1's average
    assert [c["lr"] for c in a.configs] == pytest.approx([0.1, 0.2]) and a.configs[0]["round"] == 1


BAD_PAYLOADS = {
    "garbage": (lambda good: b"\x00garbage bytes, not insitu serde" * 10, "bad magic"),
    "truncated": (lambda good: good[: len(good) - 5], "truncated"),
    "wrong shape": (lambda good: serde.dumps(Parameters.from_arrays({"w": np.zeros(4, np.float32)})), "shape"),
    "wrong dtype": (lambda good: serde.dumps(Parameters.from_arrays({"w": np.zeros(3, np.float64)})), "dtype"),
    "nan": (lambda good: serde.dumps(Parameters.from_arrays({"w": np.array([0, np.nan, 0], np.float32)})), "NaN"),
    "trailing": (lambda good: good + b"extra", "trailing"),
}


@pytest.mark.parametrize("case", sorted(BAD_PAYLOADS))
def test_bad_update_is_rejected_and_the_round_goes_on(case):
    make, reason = BAD_PAYLOADS[case]
    fed = Federation(num_rounds=1, strategy=fedavg(min_fit_clients=2, min_available_clients=3, fraction_evaluate=0.0))
    fed.add(ValueClient([2, 2, 2]), "0")
    fed.add(ValueClient([4, 4, 4]), "1")
    stub = stub_for(fed.address)
    token = raw_session(stub, "evil")
    header = pull(stub, token)
    payload = make(serde.dumps(GLOBAL))

    def messages():
        yield pb.ResultMessage(header=pb.Envelope(session_token=token, task_id=header.task_id, num_examples=5,
                                                  payload_bytes=len(payload)))
        for start in range(0, len(payload), 7):
            yield pb.ResultMessage(chunk=payload[start : start + 7])

    reply = stub.PushResult(messages(), metadata=auth(token))
    result = fed.finish()
    record = result.history.rounds[0]
    assert record.status == "ok" and record.num_results == 2
    assert np.allclose(dict(result.parameters)["w"], [3, 3, 3])
    failure = [f for f in record.failures if f["client"] == "evil"]
    assert failure and reason in failure[0]["reason"], record.failures
    if case != "nan":  # NaN decodes fine and is rejected by the round loop's validation
        assert not reply.accepted and reason in reply.message


def test_bad_metrics_and_oversized_updates_are_refused():
    fed = Federation(num_rounds=1, strategy=fedavg(min_fit_clients=1, min_available_clients=3, fraction_evaluate=0.0),
                     max_update_bytes=1000)
    fed.add(ValueClient([1, 1, 1]), "0")
    stub = stub_for(fed.address)
    tokens = [raw_session(stub, "m"), raw_session(stub, "big")]
    headers = [pull(stub, t) for t in tokens]
    good = serde.dumps(Parameters.from_arrays({"w": np.ones(3, np.float32)}))
    bad_metrics = stub.PushResult(iter([
        pb.ResultMessage(header=pb.Envelope(session_token=tokens[0], task_id=headers[0].task_id, num_examples=1,
                                            metrics_json='{"acc": "high"}')),
        pb.ResultMessage(chunk=good)]), metadata=auth(tokens[0]))
    oversized = stub.PushResult(iter([
        pb.ResultMessage(header=pb.Envelope(session_token=tokens[1], task_id=headers[1].task_id, num_examples=1,
                                            payload_bytes=10**9))]), metadata=auth(tokens[1]))
    record = fed.finish().history.rounds[0]
    assert not bad_metrics.accepted and "metric 'acc'" in bad_metrics.message
    assert not oversized.accepted and "exceeds the server's limit" in oversized.message
    assert {f["client"] for f in record.failures} == {"m", "big"}


def test_a_message_over_grpc_limits_breaks_only_that_upload():
    fed = Federation(num_rounds=1, strategy=fedavg(min_fit_clients=1, min_available_clients=2, fraction_evaluate=0.0))
    fed.add(ValueClient([1, 1, 1]), "0")
    stub = stub_for(fed.address)
    token = raw_session(stub, "huge")
    header = pull(stub, token)
    with pytest.raises(grpc.RpcError) as info:
        stub.PushResult(iter([
            pb.ResultMessage(header=pb.Envelope(session_token=token, task_id=header.task_id, num_examples=1,
                                                payload_bytes=serde.encoded_size(GLOBAL))),
            pb.ResultMessage(chunk=b"x" * (8 << 20))]), metadata=auth(token))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    record = fed.finish().history.rounds[0]
    assert record.num_results == 1
    reasons = [f["reason"] for f in record.failures if f["client"] == "huge"]
    assert reasons and "over the server's limit" in reasons[0] and "ended early" not in reasons[0], reasons


def test_unknown_protocol_version_is_told_what_the_server_speaks_and_which_side_to_upgrade():
    fed = Federation(num_rounds=1)
    stub = stub_for(fed.address)
    with pytest.raises(grpc.RpcError) as info:
        stub.Hello(pb.HelloRequest(protocol_versions=[7, 8], client_id="future"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"client speaks [7, 8], this server speaks {list(PROTOCOL_VERSIONS)}" in info.value.details()
    assert "upgrade insitu on the server" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # a protocol-2 client (tasks before envelopes)
        stub.Hello(pb.HelloRequest(protocol_versions=[2], client_id="old"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "client speaks [2]" in info.value.details() and "upgrade insitu on the client" in info.value.details()
    fed.add(ValueClient([0, 0, 0]), "0")
    fed.add(ValueClient([0, 0, 0]), "1")
    fed.finish()


def test_no_parameters_without_a_valid_session():
    fed = Federation(num_rounds=1)
    stub = stub_for(fed.address)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.PullTask(pb.PullRequest(session_token="forged", wait_s=0.1), metadata=auth("forged")))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    hello = stub.Hello(pb.HelloRequest(protocol_versions=list(PROTOCOL_VERSIONS), client_id="x"))
    with pytest.raises(grpc.RpcError) as info:  # a challenge is for the id that asked for it, once
        stub.Authenticate(pb.AuthRequest(client_id="y", nonce=hello.nonce))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    fed.add(ValueClient([0, 0, 0]), "0")
    fed.add(ValueClient([0, 0, 0]), "1")
    fed.finish()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    files = security.generate_federation(root / "ours", ["0", "1"], mutual_tls=False)
    other = security.generate_federation(root / "theirs", ["1"], mutual_tls=False)
    return files, other


def test_only_allow_listed_keys_join(keys):
    files, other = keys
    allow = security.load_allow_list(files.allow_list)
    fed = Federation(num_rounds=1, allow_list=allow, insecure=True)
    fed.add(ValueClient([1, 1, 1]), "0", signing_key=files.clients["0"].signing_key)
    with pytest.raises(ConnectionRefused, match="authentication failed.*bad signature"):
        connect(ValueClient([9, 9, 9]), fed.address, client_id="1", signing_key=other.clients["1"].signing_key)
    with pytest.raises(ConnectionRefused, match="is not allowed"):
        connect(ValueClient([9, 9, 9]), fed.address, client_id="mallory", signing_key=other.clients["1"].signing_key)
    with pytest.raises(ConnectionRefused, match="requires authentication"):
        connect(ValueClient([9, 9, 9]), fed.address, client_id="1")
    fed.add(ValueClient([3, 3, 3]), "1", signing_key=files.clients["1"].signing_key)
    result = fed.finish()
    assert np.allclose(dict(result.parameters)["w"], [2, 2, 2])


def test_straggler_past_the_deadline_is_dropped_and_its_late_result_discarded():
    fed = Federation(num_rounds=2, strategy=fedavg(min_fit_clients=2, min_available_clients=3, fraction_evaluate=0.0),
                     round_timeout_s=1.5)
    fed.add(ValueClient([1, 1, 1]), "0")
    fed.add(ValueClient([3, 3, 3]), "1")
    fed.add(ValueClient([100, 100, 100], delay=2.5), "2")
    result = fed.finish()
    first = result.history.rounds[0]
    assert first.num_results == 2 and first.failures[0]["client"] == "2"
    assert "no result within the round deadline of 2 s" in first.failures[0]["reason"]  # 1.5 s, shown as "2 s"
    assert np.allclose(dict(result.parameters)["w"], [2, 2, 2])


def test_late_joiner_takes_part_from_the_next_round():
    fed = Federation(num_rounds=3, strategy=fedavg(min_fit_clients=1, min_available_clients=1, fraction_evaluate=0.0))
    fed.add(ValueClient([1, 1, 1], delay=0.5), "0")
    while not fed.rounds:
        time.sleep(0.05)
    fed.add(ValueClient([3, 3, 3], delay=0.5), "1")
    result = fed.finish()
    assert result.history.rounds[0].selected == ["0"]
    assert result.history.rounds[-1].selected == ["0", "1"]


def test_resume_continues_from_the_last_committed_round(tmp_path):
    class Counting(ValueClient):
        def fit(self, parameters, config):  # new model = old + 1: the round count is in the weights
            return FitResult(Parameters.from_arrays({"w": dict(parameters)["w"] + 1}), 1, {})

    store = tmp_path / "run.db"
    fed = Federation(num_rounds=2, strategy=fedavg(min_fit_clients=1, min_available_clients=1, fraction_evaluate=0.0),
                     store_path=store)
    fed.add(Counting([0, 0, 0]), "0")
    assert np.allclose(dict(fed.finish().parameters)["w"], 2)
    with pytest.raises(ResumeError, match="already holds rounds 1-2"):
        FederationServer(ServerSettings(address="127.0.0.1:0", insecure=True, store_path=store)).run(
            fedavg(min_fit_clients=1, min_available_clients=1), GLOBAL, num_rounds=4)
    fed = Federation(num_rounds=4, strategy=fedavg(min_fit_clients=1, min_available_clients=1, fraction_evaluate=0.0),
                     store_path=store, resume=True)
    fed.add(Counting([0, 0, 0]), "0")
    result = fed.finish()
    assert [r.round for r in result.history.rounds] == [1, 2, 3, 4]
    assert np.allclose(dict(result.parameters)["w"], 4)


def test_same_seed_same_parameters_in_process_and_over_the_network():
    from insitu.simulation import SimulationConfig, build_experiment, simulate

    config = SimulationConfig(dataset="digits", model="mlp", num_clients=3, rounds=2, lr=0.1, min_fit_clients=3, seed=5)
    local = build_experiment(config)
    expected = simulate(local.client_fn, num_clients=3, strategy=local.strategy, num_rounds=2,
                        initial_parameters=local.initial_parameters, seed=5).parameters
    remote = build_experiment(config)
    remote.strategy.min_available_clients = 3
    server = FederationServer(ServerSettings(address="127.0.0.1:0", insecure=True, heartbeat_interval_s=0.5))
    threads = []
    for i in range(3):
        client = build_experiment(config).client_fn(str(i))
        t = threading.Thread(target=connect, args=(client, f"127.0.0.1:{server.port}"),
                             kwargs={"client_id": str(i), "poll_wait_s": 0.5}, daemon=True)
        t.start()
        threads.append(t)
    try:
        got = server.run(remote.strategy, remote.initial_parameters, num_rounds=2, seed=5).parameters
    finally:
        server.stop(grace_s=2)
    # Same training on both engines; only the order in which results arrive (and so the order of
    # the float32 sum) may differ over the network, which moves values by at most a few ulps.
    assert got.specs == expected.specs
    assert np.allclose(got.flat(), expected.flat(), rtol=1e-6, atol=1e-7)


def test_store_round_trip_and_client_registry(tmp_path):
    from insitu.run.history import Evaluation, RoundRecord
    from insitu.run.store import RunStore
    from insitu.strategies.strategy import ServerState

    store = RunStore(tmp_path / "s.db")
    assert store.load() is None
    params = Parameters.from_arrays({"w": np.arange(4, dtype=np.float32), "n": np.array(3, np.int64)})
    record = RoundRecord(round=1, num_results=2, centralized=Evaluation(0.5, {"accuracy": 0.9}))
    server_state = ServerState({"m": np.ones(4, np.float32)}, {"c": np.full(5, 0.5, np.float32)})
    store.save_round(record, params, server_state, Evaluation(2.3, {"accuracy": 0.1}))
    store.record_client("a", "joined", "peer")
    store.close()
    again = RunStore(tmp_path / "s.db")
    last, loaded, history, state = again.load()
    assert last == 1 and loaded == params and np.array_equal(state.optimizer["m"], np.ones(4))
    assert np.array_equal(state.algorithm["c"], np.full(5, 0.5))
    assert history.rounds[0].centralized.accuracy == 0.9 and history.initial.loss == 2.3
    assert again.clients()["a"]["status"] == "joined"
    from insitu.run.history import History

    again_history = History.from_dict(json.loads(json.dumps(history.to_dict())))  # JSON-safe both ways
    assert again_history.rounds[0].centralized.accuracy == 0.9 and again_history.initial.loss == 2.3


def test_a_tls_certificate_of_another_client_is_refused_even_with_a_valid_key(tmp_path):
    # Client 0's signing key (stolen) presented over client 1's TLS certificate: the certificate's
    # common name must be the id the client claims, before the signature is even looked at.
    from insitu.net.client import ClientTLS
    from insitu.net.server import ServerTLS

    files = security.generate_federation(tmp_path / "fed", ["0", "1"])
    fed = Federation(num_rounds=1, insecure=False, allow_list=security.load_allow_list(files.allow_list),
                     tls=ServerTLS(files.server_cert, files.server_key, files.ca_cert),
                     strategy=fedavg(min_fit_clients=1, min_available_clients=1, fraction_evaluate=0.0))
    one = files.clients["1"]
    with pytest.raises(ConnectionRefused, match="the TLS client certificate belongs to another client"):
        connect(ValueClient([9, 9, 9]), fed.address, client_id="0", signing_key=files.clients["0"].signing_key,
                tls=ClientTLS(one.ca_cert, one.tls_cert, one.tls_key))
    zero = files.clients["0"]
    fed.add(ValueClient([1, 1, 1]), "0", signing_key=zero.signing_key, tls=ClientTLS(zero.ca_cert, zero.tls_cert,
                                                                                       zero.tls_key))
    assert np.allclose(dict(fed.finish().parameters)["w"], 1)


def test_handshakes_per_host_are_rate_limited_and_sessions_capped():
    fed = Federation(num_rounds=1, max_handshakes_per_minute=6, max_clients=2)
    stub = stub_for(fed.address)
    raw_session(stub, "a")  # Hello + Authenticate: 2 attempts each
    raw_session(stub, "b")
    with pytest.raises(grpc.RpcError) as info:  # a third client: the server is full
        raw_session(stub, "c")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "server is full (2 clients)" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # the 7th attempt from this host within a minute
        stub.Hello(pb.HelloRequest(protocol_versions=list(PROTOCOL_VERSIONS), client_id="d"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many connection attempts" in info.value.details()
    fed.server.stop(grace_s=1)  # the run never had its clients: end it
