"""A task's or result's payload on the wire: the parameters, then any named extras, back to back.

Each section is one serde stream; the header gives every section's byte length, so the receiver
cuts the chunk sequence into sections without trusting chunk boundaries. Scalar config entries
travel as JSON in the header; array-valued ones (``Parameters``) become extras.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from insitu import serde
from insitu.client.api import Config
from insitu.net.proto import federation_pb2 as pb
from insitu.params import Parameters, ParamSpec

MAX_EXTRAS = 16


def split_config(config: Config) -> tuple[dict[str, object], dict[str, Parameters]]:
    """(JSON-able scalar entries, array-valued entries) of a config."""
    scalars = {k: v for k, v in config.items() if not isinstance(v, Parameters)}
    extras = {k: v for k, v in config.items() if isinstance(v, Parameters)}
    return scalars, extras


def describe(parameters: Parameters | None, extras: Mapping[str, Parameters]) -> tuple[int, list[pb.Extra]]:
    """The main section's size and one ``Extra`` (name, size) per extra, for the header."""
    size = serde.encoded_size(parameters) if parameters is not None else 0
    return size, [pb.Extra(name=name, payload_bytes=serde.encoded_size(p)) for name, p in extras.items()]


def iter_payload(parameters: Parameters | None, extras: Mapping[str, Parameters], chunk_size: int) -> Iterator[bytes]:
    """The parameters' chunks, then each extra's, in header order."""
    if parameters is not None:
        yield from serde.iter_chunks(parameters, chunk_size)
    for extra in extras.values():
        yield from serde.iter_chunks(extra, chunk_size)


class PayloadDecoder:
    """Splits the incoming chunks into the declared sections and decodes each one as it completes."""

    def __init__(self, main_bytes: int, extras: Sequence[pb.Extra], *, max_bytes: int,
                 expected: Sequence[ParamSpec] | None = None, expected_extras: Sequence[ParamSpec] | None = None) -> None:
        if len(extras) > MAX_EXTRAS:
            raise serde.SerdeError(f"{len(extras)} extras declared; at most {MAX_EXTRAS} are accepted")
        names = [e.name for e in extras]
        if len(set(names)) != len(names) or not all(names):
            raise serde.SerdeError(f"extras must have distinct non-empty names, got {names}")
        total = main_bytes + sum(e.payload_bytes for e in extras)
        if total > max_bytes:
            raise serde.SerdeError(f"payload of {total} bytes exceeds the limit of {max_bytes}")
        self._sections: list[tuple[str | None, int, Sequence[ParamSpec] | None]] = []
        if main_bytes:
            self._sections.append((None, main_bytes, expected))
        self._sections += [(e.name, e.payload_bytes, expected_extras) for e in extras]
        self.parameters: Parameters | None = None
        self.extras: dict[str, Parameters] = {}
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
            if self._decoder is None:
                raise serde.SerdeError("more payload bytes than the header declared")
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
            self.extras[name] = decoded
        self._index += 1
        self._decoder = self._new_decoder()
        self._left = self._sections[self._index][1] if self._decoder is not None else 0

    def finish(self) -> tuple[Parameters | None, dict[str, Parameters]]:
        if self._decoder is not None:
            raise serde.SerdeError(f"payload ended early: {self._left} bytes of section {self._index + 1} missing")
        return self.parameters, self.extras
