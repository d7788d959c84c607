"""Bytes for the protocol messages, so a network transport can carry them (never pickle).

Layout: one tag byte naming the message type, then its fields in declaration order: an int is 8
bytes little-endian unsigned, a float 8 bytes little-endian IEEE 754 (finite only), ``bytes`` a
4-byte length and the data, a tuple a 4-byte count and its items. Decoding checks every length against what is left and refuses trailing bytes, unknown tags
and oversized counts with a ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any

from insitu.privacy.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    InputRequest,
    KeyBroadcast,
    MaskedInput,
    RevealedShare,
    RoundSetup,
    RoutedShares,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)

MESSAGES: tuple[type, ...] = (AdvertiseKeys, KeyBroadcast, EncryptedShare, ShareKeys, RoutedShares, MaskedInput,
                              UnmaskRequest, RevealedShare, UnmaskResponse, RoundSetup, InputRequest)
_BY_NAME = {cls.__name__: cls for cls in MESSAGES}
_TAG = {cls: i + 1 for i, cls in enumerate(MESSAGES)}
MAX_ITEMS = 1 << 20


def _field_types(cls: type) -> list[tuple[str, str]]:
    return [(f.name, str(f.type)) for f in dataclasses.fields(cls)]


def _put(out: bytearray, kind: str, value: Any) -> None:
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
            raise ValueError(f"protocol ints are unsigned 64-bit, got {value!r}")
        out += struct.pack("<Q", value)
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"protocol floats are finite numbers, got {value!r}")
        out += struct.pack("<d", float(value))
    elif kind == "bytes":
        if not isinstance(value, bytes):
            raise ValueError(f"expected bytes, got {type(value).__name__}")
        out += struct.pack("<I", len(value)) + value
    elif kind.startswith("tuple["):
        item = kind[len("tuple["):-len(", ...]")]
        out += struct.pack("<I", len(value))
        for element in value:
            _put(out, item, element)
    elif kind in _BY_NAME:
        for name, sub in _field_types(_BY_NAME[kind]):
            _put(out, sub, getattr(value, name))
    else:
        raise ValueError(f"no encoding for field type {kind}")


def encode(message: Any) -> bytes:
    """A protocol message as bytes (tag + fields)."""
    tag = _TAG.get(type(message))
    if tag is None:
        raise ValueError(f"not a secure-aggregation message: {type(message).__name__}")
    out = bytearray([tag])
    _put(out, type(message).__name__, message)
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes | memoryview) -> None:
        self.view, self.pos = memoryview(data), 0

    def take(self, n: int) -> bytes:
        if n > len(self.view) - self.pos:
            raise ValueError(f"message truncated: needs {n} more bytes at offset {self.pos}, has {len(self.view) - self.pos}")
        chunk = bytes(self.view[self.pos : self.pos + n])
        self.pos += n
        return chunk

    def get(self, kind: str) -> Any:
        if kind == "int":
            return struct.unpack("<Q", self.take(8))[0]
        if kind == "float":
            value = struct.unpack("<d", self.take(8))[0]
            if not math.isfinite(value):
                raise ValueError(f"protocol floats are finite, got {value}")
            return value
        if kind == "bytes":
            return self.take(struct.unpack("<I", self.take(4))[0])
        if kind.startswith("tuple["):
            count = struct.unpack("<I", self.take(4))[0]
            if count > MAX_ITEMS:
                raise ValueError(f"message declares {count} items; at most {MAX_ITEMS} are accepted")
            item = kind[len("tuple["):-len(", ...]")]
            return tuple(self.get(item) for _ in range(count))
        cls = _BY_NAME[kind]
        return cls(**{name: self.get(sub) for name, sub in _field_types(cls)})


def decode(data: bytes, expected: type | None = None) -> Any:
    """The message in ``data``; with ``expected``, anything else is refused."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ValueError("empty or non-bytes secure-aggregation message")
    tag = data[0]
    if not 1 <= tag <= len(MESSAGES):
        raise ValueError(f"unknown secure-aggregation message tag {tag}")
    cls = MESSAGES[tag - 1]
    if expected is not None and cls is not expected:
        raise ValueError(f"expected a {expected.__name__} message, got {cls.__name__}")
    reader = _Reader(memoryview(data)[1:])  # no copy of the whole message; each field is copied once
    message = reader.get(cls.__name__)
    if reader.pos != len(reader.view):
        raise ValueError(f"{len(reader.view) - reader.pos} trailing bytes after a {cls.__name__} message")
    return message
