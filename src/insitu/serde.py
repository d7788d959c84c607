"""Safe, versioned binary format for :class:`~insitu.params.Parameters` on the wire or on disk.

Nothing here unpickles: a payload is a short JSON header describing the arrays, followed by their
raw little-endian bytes. Layout (version 1)::

    b"INSITU"                 6 bytes, magic
    version                   1 byte, currently 1
    header_len                uint32, little-endian, at most MAX_HEADER_BYTES
    header                    header_len bytes of UTF-8 JSON:
                              {"entries": [{"name": str, "dtype": str, "shape": [int, ...]}, ...]}
    payload                   each array's bytes, C order, little-endian, back to back, in entry order

``dtype`` is one of :data:`SUPPORTED_DTYPES`; anything else (object, structured, datetime, ...) is
refused when writing and when reading. Decoded arrays are little-endian, C-contiguous, writable and
own their memory.

Use :func:`dumps` / :func:`loads` for whole payloads, :func:`iter_chunks` / :class:`StreamDecoder`
to send and receive large ones in bounded memory (no copy of the whole payload on either end).
Every malformed or unacceptable input raises :class:`SerdeError` (a ``ValueError``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from insitu.params import Parameters, ParamSpec, describe_mismatch

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "SUPPORTED_DTYPES",
    "SUPPORTED_VERSIONS",
    "SerdeError",
    "StreamDecoder",
    "dumps",
    "iter_chunks",
    "loads",
]

MAGIC = b"INSITU"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Largest JSON header accepted (and written)."""

MAX_NDIM = 32
"""Most dimensions an array may declare (numpy 1.x's limit; numpy 2 allows 64)."""

SUPPORTED_DTYPES: tuple[str, ...] = (
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "bool",
)

_PREAMBLE_LEN = len(MAGIC) + 1 + 4  # magic, version byte, uint32 header length
_WIRE_DTYPES: dict[str, np.dtype] = {name: np.dtype(name).newbyteorder("<") for name in SUPPORTED_DTYPES}
_WIRE_NAMES: dict[np.dtype, str] = {dt: name for name, dt in _WIRE_DTYPES.items()}
_ENTRY_KEYS = frozenset({"name", "dtype", "shape"})


class SerdeError(ValueError):
    """A payload is malformed, unsupported, too large or not what was expected."""


# -- encoding --------------------------------------------------------------------------------


def _wire_dtype(name: str, dtype: np.dtype) -> np.dtype:
    """The little-endian wire dtype for an array's dtype, or SerdeError if it is not allowed."""
    if dtype.fields is None and dtype.subdtype is None:
        wire = dtype.newbyteorder("<")
        if wire in _WIRE_NAMES:
            return _WIRE_DTYPES[_WIRE_NAMES[wire]]
    raise SerdeError(f"array {name!r} has unsupported dtype {dtype} (supported: {', '.join(SUPPORTED_DTYPES)})")


def _encode_preamble(params: Parameters) -> tuple[bytes, list[np.dtype]]:
    """Magic, version, header length and header; plus each array's wire dtype."""
    return _preamble((name, array.dtype, array.shape) for name, array in params)


def _preamble(arrays: Iterable[tuple[object, np.dtype, Sequence[int]]]) -> tuple[bytes, list[np.dtype]]:
    entries: list[dict[str, Any]] = []
    dtypes: list[np.dtype] = []
    for name, dtype, shape in arrays:
        if not isinstance(name, str):
            raise SerdeError(f"array names must be str, got {type(name).__name__} {name!r}")
        wire = _wire_dtype(name, np.dtype(dtype))
        dtypes.append(wire)
        entries.append({"name": name, "dtype": _WIRE_NAMES[wire], "shape": [int(d) for d in shape]})
    try:
        header = json.dumps({"entries": entries}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SerdeError(f"array name is not encodable as UTF-8: {exc}") from None
    if len(header) > MAX_HEADER_BYTES:
        raise SerdeError(f"header too long: {len(header)} bytes (limit {MAX_HEADER_BYTES})")
    preamble = MAGIC + bytes([FORMAT_VERSION]) + len(header).to_bytes(4, "little")
    return preamble + header, dtypes


def _array_bytes(array: np.ndarray, wire: np.dtype) -> memoryview:
    """The array's bytes in C order and wire byte order (a copy only if it is not already so)."""
    contiguous = np.ascontiguousarray(array, dtype=wire)
    # ndarray.data is memoryview(ndarray) for a contiguous array; numpy's stubs declare the buffer
    # protocol only for Python >= 3.12, so memoryview(ndarray) does not type-check for 3.10.
    return contiguous.reshape(-1).view(np.uint8).data


def dumps(params: Parameters) -> bytes:
    """Serialize ``params`` into one bytes object (the stream :func:`iter_chunks` yields, joined)."""
    head, dtypes = _encode_preamble(params)
    return b"".join([head, *(_array_bytes(a, dt) for a, dt in zip(params.arrays, dtypes))])


def encoded_size(params: Parameters) -> int:
    """Length in bytes of :func:`dumps` output, without encoding the arrays."""
    head, dtypes = _encode_preamble(params)
    return len(head) + sum(int(a.size) * dt.itemsize for a, dt in zip(params.arrays, dtypes))


HEADER_SLACK_BYTES = 1024
HEADER_SLACK_PER_ARRAY = 32


def expected_header_bytes(specs: Sequence[ParamSpec]) -> int:
    """The longest JSON header a stream of parameters with these specs may declare: this encoder's header
    with every non-ASCII character escaped, plus a small slack for another encoder's spacing
    (:data:`HEADER_SLACK_BYTES`, and :data:`HEADER_SLACK_PER_ARRAY` per array), never above
    :data:`MAX_HEADER_BYTES`. A decoder that knows what to expect refuses a longer header before reading
    it, so a stream cannot be all header (hundreds of thousands of empty arrays) within a model-sized limit."""
    entries = [{"name": spec.name, "dtype": str(np.dtype(spec.dtype)), "shape": [int(d) for d in spec.shape]}
               for spec in specs]
    size = len(json.dumps({"entries": entries}, ensure_ascii=True, separators=(",", ":")))
    return min(MAX_HEADER_BYTES, size + HEADER_SLACK_BYTES + HEADER_SLACK_PER_ARRAY * len(entries))


def encoded_size_of(specs: Sequence[ParamSpec]) -> int:
    """Length in bytes of :func:`dumps` output for parameters with these specs (what an honest peer sends)."""
    head, dtypes = _preamble((spec.name, spec.dtype, spec.shape) for spec in specs)
    return len(head) + sum(math.prod(spec.shape) * dt.itemsize for spec, dt in zip(specs, dtypes))


def iter_chunks(params: Parameters, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Yield the :func:`dumps` byte stream in chunks of exactly ``chunk_size`` bytes (the last may be shorter).

    The payload is never materialized: chunks are cut from each array's own buffer, and an array
    that needs conversion (big-endian, non-contiguous) is converted on its own, when reached.
    Unsupported dtypes and bad names are refused here, before the first chunk.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    head, dtypes = _encode_preamble(params)
    return _chunked(head, params.arrays, dtypes, chunk_size)


def _chunked(head: bytes, arrays: Sequence[np.ndarray], dtypes: list[np.dtype], chunk_size: int) -> Iterator[bytes]:
    def pieces() -> Iterator[memoryview]:
        yield memoryview(head)
        for array, wire in zip(arrays, dtypes):
            yield _array_bytes(array, wire)

    pending = bytearray()  # small pieces are coalesced so every chunk but the last is full
    for piece in pieces():
        pos, end = 0, len(piece)
        while pos < end:
            if not pending and end - pos >= chunk_size:
                yield bytes(piece[pos : pos + chunk_size])
                pos += chunk_size
                continue
            take = min(chunk_size - len(pending), end - pos)
            pending += piece[pos : pos + take]
            pos += take
            if len(pending) == chunk_size:
                yield bytes(pending)
                pending.clear()
    if pending:
        yield bytes(pending)


# -- decoding --------------------------------------------------------------------------------


def _as_bytes_view(data: Any) -> memoryview:
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-finite number {token} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _parse_header(raw: bytes) -> list[ParamSpec]:
    """Validate the JSON header and return the declared arrays (dtypes are little-endian wire dtypes)."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SerdeError(f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"entries"} or not isinstance(doc["entries"], list):
        raise SerdeError('bad header schema: expected a JSON object {"entries": [...]} and nothing else')
    specs: list[ParamSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(doc["entries"]):
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise SerdeError(f"bad header schema: entry {i} must be an object with exactly the keys name, dtype, shape")
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        if not isinstance(name, str):
            raise SerdeError(f"bad header schema: entry {i} name must be a string, got {name!r}")
        if name in seen:
            raise SerdeError(f"bad header schema: duplicate array name {name!r}")
        seen.add(name)
        if not isinstance(dtype, str) or dtype not in _WIRE_DTYPES:
            raise SerdeError(
                f"array {name!r} has unknown or unsupported dtype {dtype!r} (supported: {', '.join(SUPPORTED_DTYPES)})"
            )
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            raise SerdeError(f"array {name!r} has invalid shape {shape!r}: expected a list of at most {MAX_NDIM} ints")
        for dim in shape:
            if isinstance(dim, bool) or not isinstance(dim, int):
                raise SerdeError(f"array {name!r} has invalid shape {shape!r}: dimension {dim!r} is not an integer")
            if dim < 0 or dim > sys.maxsize:
                raise SerdeError(f"array {name!r} has invalid shape {shape!r}: dimension {dim} is out of range")
        specs.append(ParamSpec(name, tuple(shape), _WIRE_DTYPES[dtype]))
    return specs


def _nbytes(spec: ParamSpec) -> int:
    size = 1
    for dim in spec.shape:  # Python ints: no overflow, however large the declared shape
        size *= dim
    return size * spec.dtype.itemsize


def _truncated(got: int, spec: ParamSpec, nbytes: int) -> SerdeError:
    return SerdeError(f"truncated stream: got {got} of {nbytes} bytes for array {spec.name!r}")


_PREAMBLE, _HEADER, _PAYLOAD, _DONE, _FINISHED = range(5)


class StreamDecoder:
    """Incrementally decode a stream produced by :func:`iter_chunks` (chunk boundaries may differ).

    Bytes are copied straight into arrays allocated once the header has been read and checked,
    so memory stays at the final arrays plus the chunk being fed. Every check happens as early as
    the data allows; the first failure raises :class:`SerdeError` and poisons the decoder.

    ``max_bytes`` caps the total declared array bytes (refused before anything is allocated; None:
    no cap). ``expected``, if given, is the exact list of names, shapes and dtypes the header must
    declare. Not thread-safe: feed it from one thread.
    """

    def __init__(self, *, max_bytes: int | None = None, expected: Sequence[ParamSpec] | None = None) -> None:
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
        self._max_bytes = max_bytes
        self._expected = tuple(expected) if expected is not None else None
        self._max_header = MAX_HEADER_BYTES if self._expected is None else expected_header_bytes(self._expected)
        self._available: int | None = None  # total stream length, when known up front (loads)
        self._state = _PREAMBLE
        self._error: SerdeError | None = None
        self._head = bytearray()  # preamble, then header; bounded by MAX_HEADER_BYTES
        self._header_len = 0
        self._specs: list[ParamSpec] = []
        self._arrays: list[np.ndarray] = []
        self._targets: list[memoryview] = []
        self._index = 0
        self._offset = 0

    # -- public ------------------------------------------------------------------------------
    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Consume the next piece of the stream (any size, including empty)."""
        self._check_usable()
        view = _as_bytes_view(chunk)
        try:
            self._consume(view)
        except SerdeError as exc:
            self._fail(exc)
            raise

    def finish(self) -> Parameters:
        """Declare the end of the stream and return the decoded Parameters (SerdeError if truncated)."""
        self._check_usable()
        try:
            if self._state == _PREAMBLE:
                raise SerdeError(f"truncated stream: got {len(self._head)} of {_PREAMBLE_LEN} preamble bytes")
            if self._state == _HEADER:
                got = len(self._head) - _PREAMBLE_LEN
                raise SerdeError(f"truncated stream: got {got} of {self._header_len} header bytes")
            if self._state == _PAYLOAD:
                spec = self._specs[self._index]
                raise _truncated(self._offset, spec, len(self._targets[self._index]))
        except SerdeError as exc:
            self._fail(exc)
            raise
        result = Parameters([s.name for s in self._specs], self._arrays, _flat=getattr(self, "_flat", None))
        self._state = _FINISHED
        self._release()
        return result

    # -- internals ---------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._error is not None:
            raise SerdeError(f"decoder already failed: {self._error}")
        if self._state == _FINISHED:
            raise SerdeError("decoder already finished")

    def _fail(self, exc: SerdeError) -> None:
        self._error = exc
        self._release()

    def _release(self) -> None:
        self._head = bytearray()
        self._arrays, self._targets = [], []

    def _consume(self, view: memoryview) -> None:
        pos, end = 0, len(view)
        while pos < end:
            if self._state == _PREAMBLE:
                take = min(_PREAMBLE_LEN - len(self._head), end - pos)
                self._head += view[pos : pos + take]
                pos += take
                self._check_preamble()
            elif self._state == _HEADER:
                take = min(_PREAMBLE_LEN + self._header_len - len(self._head), end - pos)
                self._head += view[pos : pos + take]
                pos += take
                if len(self._head) == _PREAMBLE_LEN + self._header_len:
                    self._start_payload()
            elif self._state == _PAYLOAD:
                target = self._targets[self._index]
                take = min(len(target) - self._offset, end - pos)
                target[self._offset : self._offset + take] = view[pos : pos + take]
                pos += take
                self._offset += take
                if self._offset == len(target):
                    self._complete_array()
                    self._index += 1
                    self._offset = 0
                    self._skip_empty()
            else:
                raise SerdeError(f"trailing garbage: {end - pos} bytes after the end of the declared payload")

    def _check_preamble(self) -> None:
        head = bytes(self._head)
        magic = head[: len(MAGIC)]
        if magic != MAGIC[: len(magic)]:
            raise SerdeError(f"bad magic: stream starts with {magic!r}, expected {MAGIC!r}")
        if len(head) > len(MAGIC) and head[len(MAGIC)] not in SUPPORTED_VERSIONS:
            supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
            raise SerdeError(f"unsupported format version {head[len(MAGIC)]} (supported: {supported})")
        if len(head) < _PREAMBLE_LEN:
            return
        self._header_len = int.from_bytes(head[len(MAGIC) + 1 :], "little")
        if self._header_len > self._max_header:
            if self._expected is None:
                raise SerdeError(f"header too long: {self._header_len} bytes declared (limit {MAX_HEADER_BYTES})")
            raise SerdeError(f"header too long: {self._header_len} bytes declared, but the expected parameters' "
                             f"header needs at most {self._max_header}")
        self._state = _HEADER
        if self._header_len == 0:
            self._start_payload()

    def _start_payload(self) -> None:
        specs = _parse_header(bytes(self._head[_PREAMBLE_LEN:]))
        stream_offset = len(self._head)
        self._head = bytearray()
        if self._expected is not None:
            problem = describe_mismatch(specs, self._expected)
            if problem:
                raise SerdeError(f"header does not match the expected parameters: {problem}")
        sizes = [_nbytes(s) for s in specs]
        total = sum(sizes)
        if self._max_bytes is not None and total > self._max_bytes:
            raise SerdeError(f"declared payload of {total} bytes exceeds max_bytes={self._max_bytes}")
        if self._available is not None and stream_offset + total > self._available:
            remaining = self._available - stream_offset
            for spec, nbytes in zip(specs, sizes):
                if nbytes > remaining:
                    raise _truncated(max(remaining, 0), spec, nbytes)
                remaining -= nbytes
        arrays: list[np.ndarray] = []
        self._flat = None
        if specs and all(np.dtype(s.dtype) == np.float32 for s in specs):
            # One buffer for everything: the arrays are views of it and Parameters.flat() is free.
            try:
                self._flat = np.empty(total // 4, dtype=np.float32)
            except (MemoryError, ValueError, OverflowError) as exc:
                raise SerdeError(f"cannot allocate {total} bytes for the parameters: {exc}") from None
            offset = 0
            for spec in specs:
                count = _nbytes(spec) // 4
                try:
                    arrays.append(self._flat[offset : offset + count].reshape(spec.shape))
                except (ValueError, OverflowError) as exc:
                    raise SerdeError(f"cannot allocate array {spec.name!r} of shape {spec.shape}: {exc}") from None
                offset += count
        for spec in specs[len(arrays):]:
            try:
                arrays.append(np.empty(spec.shape, dtype=spec.dtype))
            except (MemoryError, ValueError, OverflowError) as exc:
                raise SerdeError(f"cannot allocate array {spec.name!r} of shape {spec.shape}: {exc}") from None
        self._specs = specs
        self._arrays = arrays
        self._targets = [a.reshape(-1).view(np.uint8).data for a in arrays]  # writable byte views (see _array_bytes)
        self._state = _PAYLOAD
        self._index = 0
        self._offset = 0
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._targets) and len(self._targets[self._index]) == 0:
            self._index += 1
        if self._index == len(self._targets):
            self._state = _DONE

    def _complete_array(self) -> None:
        array = self._arrays[self._index]
        if array.dtype == np.bool_ and array.size and int(array.view(np.uint8).max()) > 1:
            raise SerdeError(f"array {self._specs[self._index].name!r}: bool payload holds bytes other than 0 and 1")


def loads(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int | None = None,
    expected: Sequence[ParamSpec] | None = None,
) -> Parameters:
    """Decode one whole payload from :func:`dumps`; see :class:`StreamDecoder` for the checks.

    As the payload's length is known, a header declaring more bytes than follow is refused as
    truncated before any array is allocated, even without ``max_bytes``.
    """
    view = _as_bytes_view(data)
    decoder = StreamDecoder(max_bytes=max_bytes, expected=expected)
    decoder._available = len(view)
    decoder.feed(view)
    return decoder.finish()
