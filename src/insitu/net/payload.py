"""An envelope on the wire: a header, then its body's sections back to back in chunks.

The sections are the parameters' serde stream, each named array's serde stream, then the opaque
protocol bytes. The header gives every section's byte length, so the receiver cuts the chunk
sequence into sections without trusting chunk boundaries, and refuses a body larger than its limit
before reading any of it. Scalar config travels as JSON in the header.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

from insitu import serde
from insitu.net.proto import federation_pb2 as pb
from insitu.params import Parameters, ParamSpec
from insitu.protocols.envelope import Envelope

MAX_EXTRAS = 16


def header(envelope: Envelope, task_id: str, session_token: str = "") -> pb.Envelope:
    """The wire header of ``envelope``: its routing fields, scalars and the size of every body section."""
    size = serde.encoded_size(envelope.parameters) if envelope.parameters is not None else 0
    extras = [pb.Extra(name=name, payload_bytes=serde.encoded_size(p)) for name, p in envelope.arrays.items()]
    return pb.Envelope(task_id=task_id, protocol=envelope.protocol, step=envelope.step, round=envelope.round,
                       model_version=envelope.model_version, config_json=json.dumps(envelope.config),
                       payload_bytes=size, extras=extras, message_bytes=len(envelope.message),
                       num_examples=envelope.num_examples, loss=envelope.loss,
                       metrics_json=json.dumps({k: float(v) for k, v in envelope.metrics.items()}),
                       session_token=session_token)


def declared_bytes(head: pb.Envelope) -> int:
    """The body bytes a header announces: parameters, every named array and the protocol bytes."""
    return head.payload_bytes + sum(e.payload_bytes for e in head.extras) + head.message_bytes


def iter_body(envelope: Envelope, chunk_size: int) -> Iterator[bytes | memoryview]:
    """The parameters' chunks, then each named array's, then the protocol bytes, in header order."""
    if envelope.parameters is not None:
        yield from serde.iter_chunks(envelope.parameters, chunk_size)
    for array in envelope.arrays.values():
        yield from serde.iter_chunks(array, chunk_size)
    view = memoryview(envelope.message)
    for start in range(0, len(view), chunk_size):
        yield view[start : start + chunk_size]


class BodyDecoder:
    """Splits the incoming chunks into the declared sections and decodes each one as it completes.

    ``expected``: the names, shapes and dtypes the parameter section must have; ``arrays_expected``:
    those every named array must have (the server passes the model's specs for both: every algorithm's
    extras are shaped like the model, see :func:`insitu.algorithms.base.check_extras`). Each is checked
    from the section's serde header before its values are read, and a header longer than the expected
    one's (plus a small slack) is refused before its JSON is parsed, so a model-sized section cannot be
    all header."""

    def __init__(self, head: pb.Envelope, *, max_bytes: int, expected: Sequence[ParamSpec] | None = None,
                 arrays_expected: Sequence[ParamSpec] | None = None) -> None:
        if len(head.extras) > MAX_EXTRAS:
            raise serde.SerdeError(f"{len(head.extras)} extras declared; at most {MAX_EXTRAS} are accepted")
        names = [e.name for e in head.extras]
        if len(set(names)) != len(names) or not all(names):
            raise serde.SerdeError(f"extras must have distinct non-empty names, got {names}")
        total = declared_bytes(head)
        if total > max_bytes:
            raise serde.SerdeError(f"payload of {total} bytes exceeds the limit of {max_bytes}")
        self._sections: list[tuple[str | None, int, Sequence[ParamSpec] | None]] = []
        if head.payload_bytes:
            self._sections.append((None, head.payload_bytes, expected))
        self._sections += [(e.name, e.payload_bytes, arrays_expected) for e in head.extras]
        self._message_bytes = head.message_bytes
        self.parameters: Parameters | None = None
        self.arrays: dict[str, Parameters] = {}
        self._message = bytearray()
        self._index, self._left = 0, self._sections[0][1] if self._sections else 0
        self._decoder = self._new_decoder()

    def _new_decoder(self) -> serde.StreamDecoder | None:
        if self._index >= len(self._sections):
            return None
        _, size, expected = self._sections[self._index]
        return serde.StreamDecoder(max_bytes=max(size, 1), expected=expected)

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while len(view):
            if self._decoder is None:  # the serde sections are done: the rest is protocol bytes
                if len(view) > self._message_bytes - len(self._message):
                    raise serde.SerdeError("more payload bytes than the header declared")
                self._message += view
                return
            take = min(self._left, len(view))
            self._decoder.feed(view[:take])
            view, self._left = view[take:], self._left - take
            if self._left == 0:
                self._complete()

    def _complete(self) -> None:
        assert self._decoder is not None
        name = self._sections[self._index][0]
        decoded = self._decoder.finish()
        if name is None:
            self.parameters = decoded
        else:
            self.arrays[name] = decoded
        self._index += 1
        self._decoder = self._new_decoder()
        self._left = self._sections[self._index][1] if self._decoder is not None else 0

    def finish(self) -> tuple[Parameters | None, dict[str, Parameters], bytes]:
        """(parameters, named arrays, protocol bytes) once every declared byte arrived."""
        if self._decoder is not None:
            raise serde.SerdeError(f"payload ended early: {self._left} bytes of section {self._index + 1} missing")
        if len(self._message) != self._message_bytes:
            raise serde.SerdeError(f"payload ended early: {self._message_bytes - len(self._message)} bytes of the "
                                   "protocol message missing")
        return self.parameters, self.arrays, bytes(self._message)
