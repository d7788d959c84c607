"""The envelope on the wire and the reply limits its task declares, without a network (fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from insitu import serde
from insitu.engines.grpc_pool import MESSAGE_BYTES_PER_VALUE, MESSAGE_SLACK_BYTES, GrpcClientPool, PendingTask
from insitu.net import payload
from insitu.net.servicer import FederationServicer
from insitu.params import Parameters
from insitu.protocols import plain
from insitu.protocols.base import ClientPolicy
from insitu.protocols.envelope import Envelope, Expect
from insitu.protocols.registry import client_handlers

MODEL = Parameters.from_arrays({"w": np.arange(6, dtype=np.float32)})
SRC = Path(__file__).resolve().parents[1] / "src" / "insitu"


def test_an_envelope_body_survives_any_chunking_parameters_arrays_then_protocol_bytes():
    envelope = Envelope("p", "s", 3, 2, {"lr": 0.5}, MODEL, {"c": Parameters.from_arrays({"z": np.ones(2, np.int64)})},
                        bytes(range(200)))
    head = payload.header(envelope, "task-1")
    assert (head.protocol, head.step, head.round, head.model_version, head.message_bytes) == ("p", "s", 3, 2, 200)
    blob = b"".join(bytes(chunk) for chunk in payload.iter_body(envelope, 64))
    assert len(blob) == payload.declared_bytes(head)
    for cut in (1, 7, 64, len(blob)):
        decoder = payload.BodyDecoder(head, max_bytes=len(blob), expected=MODEL.specs)
        for i in range(0, len(blob), cut):
            decoder.feed(blob[i : i + cut])
        parameters, arrays, message = decoder.finish()
        assert parameters == MODEL and arrays["c"] == envelope.arrays["c"] and message == envelope.message
    decoder = payload.BodyDecoder(head, max_bytes=len(blob))
    decoder.feed(blob[:-1])
    with pytest.raises(serde.SerdeError, match="1 bytes of the protocol message missing"):
        decoder.finish()
    with pytest.raises(serde.SerdeError, match="more payload bytes than the header declared"):
        payload.BodyDecoder(head, max_bytes=len(blob)).feed(blob + b"x")


def _servicer() -> FederationServicer:
    return FederationServicer(GrpcClientPool(), allow_list=None)


def _task(expect: Expect) -> PendingTask:
    return PendingTask("t", "c", plain.task_envelope("fit", MODEL, 0, {"round": 1}), expect, MODEL.specs)


def _reply(**sections: object) -> object:
    return payload.header(Envelope("fit", **sections), "t")  # type: ignore[arg-type]


def test_what_a_reply_may_declare_comes_from_its_task_not_from_its_protocol_name():
    servicer = _servicer()
    fit, evaluate = _task(plain.expect("fit")), _task(plain.expect("evaluate"))
    servicer._check_declared(fit, _reply(parameters=MODEL))  # a fit result: parameters
    with pytest.raises(serde.SerdeError, match="must carry parameters"):
        servicer._check_declared(fit, _reply())
    with pytest.raises(serde.SerdeError, match="a protocol message of 3 bytes exceeds the 0 bytes"):
        servicer._check_declared(fit, _reply(parameters=MODEL, message=b"abc"))
    with pytest.raises(serde.SerdeError, match="not part of a reply to this task"):
        servicer._check_declared(evaluate, _reply(parameters=MODEL))  # an evaluation carries no body
    protocol = _task(Expect(message_bytes=4))
    servicer._check_declared(protocol, _reply(message=b"abcd"))
    with pytest.raises(serde.SerdeError, match="exceeds the 4 bytes"):
        servicer._check_declared(protocol, _reply(message=b"abcde"))
    with pytest.raises(serde.SerdeError, match=r"extra 'x' .*accepted extras: none"):
        servicer._check_declared(protocol, _reply(arrays={"x": MODEL}))


def test_a_protocol_cannot_declare_replies_beyond_what_the_model_justifies():
    pool = GrpcClientPool()
    too_much = MESSAGE_BYTES_PER_VALUE * MODEL.num_values + MESSAGE_SLACK_BYTES + 1
    with pytest.raises(ValueError, match="the protocol declares too much"):
        next(pool.exchange([("c", Envelope("p", parameters=MODEL))], Expect(message_bytes=too_much)))


def test_plain_handlers_round_trip_and_a_noise_floor_refuses_them():
    class Echo:
        def fit(self, parameters, config):
            from insitu.client.api import FitResult
            assert config == {"round": 1, "lr": 0.1, "c": MODEL}  # scalars and named arrays, by name
            return FitResult(parameters, 7, {"acc": 0.5})

        def evaluate(self, parameters, config):
            from insitu.client.api import EvalResult
            return EvalResult(0.25, 3, {})

    task = plain.task_envelope("fit", MODEL, 4, {"round": 1, "lr": 0.1, "c": MODEL})
    assert task.config == {"round": 1, "lr": 0.1} and list(task.arrays) == ["c"] and task.model_version == 4
    handlers = client_handlers(Echo())
    reply = handlers["fit"].handle(task)
    result = plain.read_reply("fit", reply)
    assert result.parameters == MODEL and result.num_examples == 7 and result.metrics == {"acc": 0.5}
    evaluation = plain.read_reply("evaluate", handlers["evaluate"].handle(plain.task_envelope("evaluate", MODEL, 4, {})))
    assert (evaluation.loss, evaluation.num_examples) == (0.25, 3)
    floor = client_handlers(Echo(), ClientPolicy(min_noise_multiplier=1.0))
    with pytest.raises(ValueError, match="plain fit task"):
        floor["fit"].handle(task)


def test_the_transport_knows_no_protocol_by_name():
    for folder in ("net", "engines"):
        for path in (SRC / folder).rglob("*.py"):
            assert "secagg" not in path.read_text().lower(), path


def _header_bomb(limit: int) -> bytes:
    """A serde stream that is all header: zero-size arrays filling a JSON header of about ``limit`` bytes."""
    import json
    import struct

    entry = len(json.dumps({"name": "a0000000", "dtype": "float32", "shape": [0]})) + 1
    entries = [{"name": f"a{i:07d}", "dtype": "float32", "shape": [0]} for i in range((limit - 64) // entry)]
    head = json.dumps({"entries": entries}, separators=(",", ":")).encode()
    return serde.MAGIC + bytes([serde.FORMAT_VERSION]) + struct.pack("<I", len(head)) + head


def test_a_reply_section_that_is_all_header_is_refused_before_its_header_is_read():
    """The review's bomb: an extras section within the model's size that is one 16 MiB JSON header of zero-size
    arrays (307k of them) cost the server ~19x its size once parsed and held. Every section of a reply is now
    decoded against the model's specs, and a header longer than the model's is refused from its length."""
    import tracemalloc

    from insitu.engines.grpc_pool import PendingTask
    from insitu.net.proto import federation_pb2 as pb
    from insitu.net.servicer import _Upload

    model = Parameters.from_arrays({"w": np.zeros(4_200_000, np.float32)})
    bomb = _header_bomb(serde.MAX_HEADER_BYTES)
    assert len(bomb) <= serde.encoded_size(model)  # within what a section may declare
    head = payload.header(Envelope("fit", parameters=model), "t")
    head.extras.append(pb.Extra(name="scaffold_delta_c", payload_bytes=len(bomb)))
    body = serde.dumps(model) + bomb
    servicer = _servicer()
    task = PendingTask("t", "c", plain.task_envelope("fit", model, 0, {"round": 1}),
                       Expect(parameters=True, arrays=frozenset({"scaffold_delta_c"}), training=True), model.specs)
    servicer._check_declared(task, head)  # the declared sizes alone are acceptable
    step = 1 << 20
    messages = iter([pb.ResultMessage(chunk=body[i : i + step]) for i in range(step, len(body), step)])
    reply = Envelope("fit")
    tracemalloc.start()
    try:
        with pytest.raises(serde.SerdeError, match="header too long: .* expected parameters' header needs at most"):
            servicer._decode(_Upload("test", None, True), task, head, reply, body[:step], messages)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * serde.encoded_size(model) + (8 << 20), peak  # the parameters section, not 19x the bomb


def test_every_reply_section_is_decoded_against_the_model_and_honest_extras_pass():
    model = Parameters.from_arrays({"w": np.arange(6, dtype=np.float32)})
    delta_c = Parameters.from_arrays({"w": np.ones(6, np.float32)})
    envelope = Envelope("fit", parameters=model, arrays={"scaffold_delta_c": delta_c})
    head = payload.header(envelope, "t")
    blob = b"".join(bytes(chunk) for chunk in payload.iter_body(envelope, 64))
    decoder = payload.BodyDecoder(head, max_bytes=len(blob), expected=model.specs, arrays_expected=model.specs)
    decoder.feed(blob)
    parameters, arrays, _ = decoder.finish()
    assert parameters == model and arrays["scaffold_delta_c"] == delta_c
    odd = Envelope("fit", parameters=model, arrays={"scaffold_delta_c": Parameters.from_arrays({"z": np.ones(2)})})
    blob = b"".join(bytes(chunk) for chunk in payload.iter_body(odd, 64))
    decoder = payload.BodyDecoder(payload.header(odd, "t"), max_bytes=len(blob), expected=model.specs,
                                  arrays_expected=model.specs)
    with pytest.raises(serde.SerdeError, match="header does not match the expected parameters"):
        decoder.feed(blob)


def test_under_a_noise_floor_only_protocols_that_declare_they_honour_it_are_served(monkeypatch):
    """A plugin handler that never looks at the policy would send this client's update in the clear: under a
    floor it is not built, and its tasks fail naming the protocol."""
    from insitu.protocols import registry
    from insitu.protocols.secagg import SecAggHandler

    built = []

    class Leaky:  # declares nothing
        def __init__(self, client, policy):
            built.append(policy)

        def handle(self, task):
            return Envelope("leaky", parameters=task.parameters)

    class Careful(Leaky):
        honours_noise_floor = True

    monkeypatch.setattr(registry, "HANDLERS", dict(registry.HANDLERS))
    registry.register_handler("leaky", Leaky)
    registry.register_handler("careful", Careful)
    assert all(registry.honours_noise_floor(f) for f in (plain.FitHandler, plain.EvaluateHandler, SecAggHandler))
    task = Envelope("leaky", parameters=MODEL)
    assert client_handlers(object())["leaky"].handle(task).parameters == MODEL  # no floor: served
    built.clear()
    handlers = client_handlers(object(), ClientPolicy(min_noise_multiplier=1.0))
    assert set(handlers) == set(registry.HANDLERS) and len(built) == 1  # only Careful was built
    with pytest.raises(ValueError, match="--dp-min-noise 1 and protocol 'leaky' does not declare it honours"):
        handlers["leaky"].handle(task)
    assert isinstance(handlers["careful"], Careful) and isinstance(handlers["secagg"], SecAggHandler)


def test_a_fit_task_accepts_only_the_extras_of_the_algorithm_its_config_names():
    from insitu.algorithms import ALGORITHM, SCAFFOLD_DELTA_C

    assert SCAFFOLD_DELTA_C in plain.expect("fit").arrays  # without configs: every registered algorithm's
    assert plain.expect("fit", [{"round": 1}]).arrays == frozenset()  # local SGD returns none
    assert plain.expect("fit", [{ALGORITHM: "fedprox"}]).arrays == frozenset()
    assert plain.expect("fit", [{ALGORITHM: "scaffold"}]).arrays == frozenset({SCAFFOLD_DELTA_C})
    servicer = _servicer()
    fedavg_task = _task(plain.expect("fit", [{"round": 1}]))
    with pytest.raises(serde.SerdeError, match=r"extra 'scaffold_delta_c' .*accepted extras: none"):
        servicer._check_declared(fedavg_task, _reply(parameters=MODEL, arrays={SCAFFOLD_DELTA_C: MODEL}))
    scaffold_task = _task(plain.expect("fit", [{ALGORITHM: "scaffold"}]))
    servicer._check_declared(scaffold_task, _reply(parameters=MODEL, arrays={SCAFFOLD_DELTA_C: MODEL}))
    bigger = Parameters.from_arrays({"w": np.zeros(MODEL.num_values + 1024, np.float32)})
    with pytest.raises(serde.SerdeError, match="extra 'scaffold_delta_c' of .* bytes exceeds the model's size"):
        servicer._check_declared(scaffold_task, _reply(parameters=MODEL, arrays={SCAFFOLD_DELTA_C: bigger}))
