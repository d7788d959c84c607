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
