import json
import random
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

from insitu import serde
from insitu.params import Parameters, ParamSpec
from insitu.serde import SUPPORTED_DTYPES, SerdeError, StreamDecoder, dumps, iter_chunks, loads


def _sample() -> Parameters:
    rng = np.random.default_rng(0)
    return Parameters.from_arrays(
        {
            "fc1.weight": rng.standard_normal((16, 8)).astype(np.float32),
            "fc1.bias": rng.standard_normal(16).astype(np.float64),
            "bn.num_batches_tracked": np.array(123456789012, dtype=np.int64),
            "mask": rng.integers(0, 2, size=(3, 5)).astype(bool),
            "half": rng.standard_normal(7).astype(np.float16),
            "bytes": np.arange(11, dtype=np.uint8),
            "empty": np.zeros((0, 4), dtype=np.int32),
        }
    )


def _frame(header: bytes | str | object, payload: bytes = b"", version: int = 1) -> bytes:
    """A stream with an arbitrary header (JSON-encoded unless already bytes/str)."""
    if not isinstance(header, (bytes, str)):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    return b"INSITU" + bytes([version]) + struct.pack("<I", len(header)) + header + payload


def _one(name: str = "w", dtype: str = "float32", shape: object = (4,)) -> dict:
    return {"entries": [{"name": name, "dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape}]}


def _stream_decode(data: bytes, sizes=(1, 2, 3, 5, 8, 13), **kwargs) -> Parameters:
    decoder = StreamDecoder(**kwargs)
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        decoder.feed(data[pos : pos + n])
        pos, i = pos + n, i + 1
    return decoder.finish()


def _both(data: bytes, **kwargs):
    """Decode whole and streamed; both must raise or both return equal results."""
    return loads(data, **kwargs), _stream_decode(data, **kwargs)


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4)])
def test_round_trip_every_dtype_and_shape(dtype, shape):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal(shape) * 50).astype(dtype)
    params = Parameters.from_arrays({"x": array})
    data = dumps(params)
    for decoded in _both(data):
        assert decoded == params
        assert decoded.arrays[0].dtype == np.dtype(dtype)
        assert decoded.arrays[0].shape == shape


def test_round_trip_mixed_and_empty():
    params = _sample()
    whole, streamed = _both(dumps(params))
    assert whole == params and streamed == params
    assert int(whole.arrays[2]) == 123456789012
    empty = Parameters([], [])
    assert loads(dumps(empty)) == empty
    assert list(iter_chunks(empty, 4)) and b"".join(iter_chunks(empty, 4)) == dumps(empty)


def test_round_trip_torch_module_state_with_int64_buffer():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net.train()
    net(torch.randn(5, 3))
    params = Parameters.from_module(net)
    decoded = loads(dumps(params))
    assert decoded == params
    clone = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    decoded.to_module(clone)
    for (k, a), (_, b) in zip(net.state_dict().items(), clone.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), k


def test_big_endian_and_non_contiguous_inputs_encode_as_little_endian():
    native = np.arange(12, dtype=np.float64).reshape(3, 4)
    params = Parameters.from_arrays({"be": native.astype(">f8"), "t": native.T, "i": np.array([1, -2], dtype=">i4")})
    expected = Parameters.from_arrays(
        {"be": native, "t": np.ascontiguousarray(native.T), "i": np.array([1, -2], np.int32)}
    )
    assert dumps(params) == dumps(expected)
    assert b"".join(iter_chunks(params, 5)) == dumps(expected)
    decoded = loads(dumps(params))
    assert decoded == expected
    assert all(a.dtype.byteorder in "=|<" for a in decoded.arrays)


def test_decoded_arrays_are_owned_writable_and_contiguous():
    data = bytearray(dumps(_sample()))
    for decoded in (loads(data), loads(memoryview(data)), loads(bytes(data))):
        for a in decoded.arrays:
            assert a.flags.c_contiguous and a.flags.writeable
    before = loads(data)
    data[-1] ^= 0xFF  # the decoded arrays must not alias the input buffer
    assert before == _sample()


def test_unicode_names_round_trip():
    params = Parameters.from_arrays({"couche.poids-é": np.ones(2, np.float32), "层": np.zeros(1, np.int8)})
    assert loads(dumps(params)) == params


# -- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 4096, 1 << 20])
def test_chunks_concatenate_to_dumps_and_are_full(chunk_size):
    params = _sample()
    chunks = list(iter_chunks(params, chunk_size))
    assert b"".join(chunks) == dumps(params)
    assert all(isinstance(c, bytes) for c in chunks)
    assert all(len(c) == chunk_size for c in chunks[:-1]) and 0 < len(chunks[-1]) <= chunk_size


def test_decoder_accepts_odd_pieces_and_any_chunking():
    params = _sample()
    data = dumps(params)
    assert _stream_decode(data, sizes=(3, 1, 17, 2, 255)) == params
    assert _stream_decode(data, sizes=(len(data),)) == params
    decoder = StreamDecoder()
    for chunk in iter_chunks(params, 7):
        decoder.feed(b"")
        decoder.feed(memoryview(chunk))
    assert decoder.finish() == params


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_iter_chunks_rejects_bad_chunk_size(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        iter_chunks(_sample(), bad)


def test_streaming_memory_is_bounded_on_both_ends():
    big = np.arange(2_000_000, dtype=np.float32)  # 8 MB
    params = Parameters.from_arrays({"big": big})
    chunk = 64 * 1024
    tracemalloc.start()
    try:
        for _ in iter_chunks(params, chunk):
            pass
        _, send_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        decoder = StreamDecoder()
        for piece in iter_chunks(params, chunk):
            decoder.feed(piece)
        decoded = decoder.finish()
        _, recv_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded == params
    assert send_peak < 4 * chunk, send_peak  # never a copy of the payload
    assert recv_peak < big.nbytes + 8 * chunk, recv_peak  # the final array plus a chunk or so


# -- refusals when writing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.array([object(), 1], dtype=object),
        np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]),
        np.zeros(2, dtype=np.complex64),
        np.zeros(2, dtype=np.uint16),
        np.zeros(2, dtype="datetime64[s]"),
        np.array(["a", "b"]),
        np.zeros(2, dtype=np.float32).view([("f", "<f4")]),
    ],
)
def test_write_refuses_unsupported_dtypes_eagerly(array):
    params = Parameters.from_arrays({"bad": array})
    with pytest.raises(SerdeError, match=r"array 'bad' has unsupported dtype"):
        dumps(params)
    with pytest.raises(SerdeError, match="unsupported dtype"):
        iter_chunks(params)  # before the first chunk is asked for


def test_write_refuses_oversized_header_and_unencodable_names(monkeypatch):
    with pytest.raises(SerdeError, match="UTF-8"):
        dumps(Parameters.from_arrays({"\ud800": np.zeros(1, np.float32)}))
    monkeypatch.setattr(serde, "MAX_HEADER_BYTES", 32)
    with pytest.raises(SerdeError, match="header too long"):
        dumps(_sample())


# -- refusals when reading --------------------------------------------------------------------


def _raises_both(data: bytes, match: str, **kwargs) -> None:
    with pytest.raises(SerdeError, match=match):
        loads(data, **kwargs)
    with pytest.raises(SerdeError, match=match):
        _stream_decode(data, **kwargs)


def test_bad_magic_is_caught_on_the_first_byte():
    _raises_both(b"PICKLE" + dumps(_sample())[6:], "bad magic")
    decoder = StreamDecoder()
    with pytest.raises(SerdeError, match="bad magic"):
        decoder.feed(b"\x80")  # a pickle's first byte
    with pytest.raises(SerdeError, match="already failed: bad magic"):
        decoder.feed(b"INSITU")
    with pytest.raises(SerdeError, match="already failed"):
        decoder.finish()


def test_unsupported_version_names_the_supported_ones():
    data = bytearray(dumps(_sample()))
    data[6] = 2
    _raises_both(bytes(data), r"unsupported format version 2 \(supported: 1\)")
    decoder = StreamDecoder()
    with pytest.raises(SerdeError, match="version 0"):
        decoder.feed(b"INSITU\x00")


def test_header_too_long_is_refused_from_the_length_alone():
    decoder = StreamDecoder()
    with pytest.raises(SerdeError, match=r"header too long: 4294967295 bytes"):
        decoder.feed(b"INSITU\x01\xff\xff\xff\xff")
    with pytest.raises(SerdeError, match="header too long"):
        loads(b"INSITU\x01" + struct.pack("<I", serde.MAX_HEADER_BYTES + 1) + b"{}")


@pytest.mark.parametrize(
    "header",
    [b"", b"not json", b"\xff\xfe{}", b"{", b"[" * 200_000 + b"]" * 200_000, b'{"entries": [], "entries": []}'],
)
def test_header_not_json(header):
    _raises_both(_frame(header), "header is not valid UTF-8 JSON")


@pytest.mark.parametrize(
    "header, match",
    [
        ([], "expected a JSON object"),
        ({}, "expected a JSON object"),
        ({"entries": {}}, "expected a JSON object"),
        ({"entries": [], "meta": 1}, "and nothing else"),
        ({"entries": [1]}, "entry 0 must be an object"),
        ({"entries": [{"name": "w", "dtype": "float32"}]}, "entry 0 must be an object with exactly"),
        ({"entries": [{"name": "w", "dtype": "float32", "shape": [], "x": 1}]}, "exactly the keys"),
        ({"entries": [{"name": 3, "dtype": "float32", "shape": []}]}, "entry 0 name must be a string"),
        (
            {"entries": [{"name": "w", "dtype": "int8", "shape": []}, {"name": "w", "dtype": "int8", "shape": []}]},
            "duplicate array name 'w'",
        ),
    ],
)
def test_header_wrong_schema(header, match):
    _raises_both(_frame(header, b"\x00\x00"), f"bad header schema: .*{match}")


@pytest.mark.parametrize("dtype", ["complex64", "object", "O", "float128", "uint16", "<f4", "V8", 5, None])
def test_unknown_dtype(dtype):
    _raises_both(_frame(_one(dtype=dtype), b"\x00" * 16), r"array 'w' has unknown or unsupported dtype")


@pytest.mark.parametrize(
    "shape, match",
    [
        ([-1], "out of range"),
        ([2, -3], "out of range"),
        ([1.5], "not an integer"),
        ([2.0], "not an integer"),
        (["4"], "not an integer"),
        ([True], "not an integer"),
        ([None], "not an integer"),
        ([2**70], "out of range"),
        ("4", "expected a list"),
        (4, "expected a list"),
        ([1] * 33, "at most 32"),
    ],
)
def test_bad_shape(shape, match):
    _raises_both(_frame(_one(shape=shape), b"\x00" * 16), f"array 'w' has invalid shape .*{match}")


def test_non_finite_numbers_in_header_are_refused():
    _raises_both(_frame('{"entries": [{"name": "w", "dtype": "float32", "shape": [NaN]}]}'), "not valid UTF-8 JSON")


def test_max_bytes_refuses_huge_declaration_before_allocating():
    huge = _frame(_one(shape=[10**6, 10**6]))  # 4 TB of float32 declared
    tracemalloc.start()
    try:
        with pytest.raises(SerdeError, match=r"declared payload of 4000000000000 bytes exceeds max_bytes=1048576"):
            StreamDecoder(max_bytes=1 << 20).feed(huge)
        with pytest.raises(SerdeError, match="exceeds max_bytes"):
            loads(huge, max_bytes=1 << 20)
        # Without a cap, loads still refuses: it knows the bytes are not there.
        with pytest.raises(SerdeError, match=r"truncated stream: got 0 of 4000000000000 bytes for array 'w'"):
            loads(huge)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # refused from the header: nothing near the declared size was allocated


def test_max_bytes_is_inclusive_and_validated():
    params = _sample()
    total = sum(a.nbytes for a in params.arrays)
    assert loads(dumps(params), max_bytes=total) == params
    _raises_both(dumps(params), f"declared payload of {total} bytes exceeds max_bytes={total - 1}", max_bytes=total - 1)
    with pytest.raises(ValueError, match="max_bytes"):
        StreamDecoder(max_bytes=-1)


def test_trailing_garbage():
    data = dumps(_sample())
    _raises_both(data + b"\x00", "trailing garbage: 1 bytes")
    decoder = StreamDecoder()
    decoder.feed(data)
    with pytest.raises(SerdeError, match="trailing garbage"):
        decoder.feed(b"more")
    # Also when the last array is empty, or there are none.
    empty = dumps(Parameters([], []))
    _raises_both(empty + b"x", "trailing garbage")


def test_truncated_payload_names_the_array():
    params = Parameters.from_arrays({"fc1.weight": np.ones(1024, np.float32), "fc1.bias": np.ones(4, np.float32)})
    data = dumps(params)
    payload_start = len(data) - 4096 - 16
    cut = data[: payload_start + 1000]
    expected = r"truncated stream: got 1000 of 4096 bytes for array 'fc1.weight'"
    _raises_both(cut, expected)
    _raises_both(data[:-3], r"truncated stream: got 13 of 16 bytes for array 'fc1.bias'")


@pytest.mark.parametrize(
    "cut, match", [(0, "got 0 of 11 preamble"), (5, "got 5 of 11 preamble"), (20, r"got 9 of \d+ header bytes")]
)
def test_truncated_preamble_and_header(cut, match):
    _raises_both(dumps(_sample())[:cut], f"truncated stream: {match}")


def test_bool_payload_must_be_zero_or_one():
    _raises_both(_frame(_one(dtype="bool", shape=[3]), b"\x00\x01\x02"), "bool payload holds bytes other than 0 and 1")


def test_finished_decoder_refuses_more():
    decoder = StreamDecoder()
    decoder.feed(dumps(_sample()))
    decoder.finish()
    with pytest.raises(SerdeError, match="already finished"):
        decoder.feed(b"")
    with pytest.raises(SerdeError, match="already finished"):
        decoder.finish()


# -- expected specs ---------------------------------------------------------------------------


def test_expected_specs_match_and_mismatch():
    params = _sample()
    data = dumps(params)
    assert loads(data, expected=params.specs) == params
    specs = list(params.specs)
    cases = [
        (specs[:-1], "7 arrays where 6 were expected"),
        (
            [ParamSpec("other", s.shape, s.dtype) if i == 0 else s for i, s in enumerate(specs)],
            "'fc1.weight' where 'other'",
        ),
        (
            [ParamSpec(s.name, (8, 16), s.dtype) if i == 0 else s for i, s in enumerate(specs)],
            r"'fc1.weight' has shape \(16, 8\)",
        ),
        (
            [ParamSpec(s.name, s.shape, np.float32) if i == 1 else s for i, s in enumerate(specs)],
            "'fc1.bias' has dtype float64",
        ),
    ]
    header_end = 11 + int.from_bytes(data[7:11], "little")
    for expected, match in cases:
        _raises_both(data, f"header does not match the expected parameters: .*{match}", expected=expected)
        decoder = StreamDecoder(expected=expected)
        with pytest.raises(SerdeError, match=match):
            decoder.feed(data[:header_end])  # refused before any payload byte


# -- fuzz -------------------------------------------------------------------------------------


def test_fuzz_mutations_raise_serde_error_or_decode():
    data = dumps(_sample())
    rng = random.Random(1234)
    outcomes = {"error": 0, "decoded": 0}
    for _ in range(200):
        buf = bytearray(data)
        kind = rng.randrange(5)
        if kind == 0:  # flip random bytes, biased towards the preamble and header
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(min(len(buf), 200)) if rng.random() < 0.7 else rng.randrange(len(buf))
                buf[pos] = rng.randrange(256)
        elif kind == 1:
            del buf[rng.randrange(len(buf)) :]
        elif kind == 2:
            pos = rng.randrange(len(buf))
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 3:
            pos = rng.randrange(len(buf))
            del buf[pos : pos + rng.randint(1, 8)]
        else:  # swap a digit in the JSON for another, changing shapes and lengths
            digits = [i for i in range(11, 200) if chr(buf[i]).isdigit()]
            buf[rng.choice(digits)] = ord(str(rng.randrange(10)))
        blob = bytes(buf)
        results = []
        for decode in (
            lambda b: loads(b, max_bytes=1 << 20),
            lambda b: _stream_decode(b, sizes=(7, 64), max_bytes=1 << 20),
        ):
            try:
                results.append(decode(blob))
                outcomes["decoded"] += 1
            except SerdeError:
                results.append(None)
                outcomes["error"] += 1
        assert (results[0] is None) == (results[1] is None)
        if results[0] is not None:
            a, b = results
            assert a.specs == b.specs
            assert all(x.tobytes() == y.tobytes() for x, y in zip(a.arrays, b.arrays))
    assert outcomes["error"] > 0 and outcomes["decoded"] > 0


def test_zero_size_array_with_absurd_dims_is_refused():
    _raises_both(_frame(_one(shape=[0, 2**62])), r"cannot allocate array 'w' of shape \(0, 4611686018427387904\)")


def test_encoded_size_matches_dumps() -> None:
    import numpy as np

    from insitu.params import Parameters
    from insitu.serde import dumps, encoded_size

    params = Parameters.from_arrays({"w": np.zeros((3, 4), np.float32), "n": np.array(5, np.int64)})
    assert encoded_size(params) == len(dumps(params))


def test_a_decoder_that_knows_its_specs_refuses_a_longer_header_from_the_length_alone():
    expected = [ParamSpec("w", (3,), np.dtype(np.float32)), ParamSpec("b", (), np.dtype(np.int64))]
    limit = serde.expected_header_bytes(expected)
    assert limit < 2048
    decoder = StreamDecoder(expected=expected)
    with pytest.raises(SerdeError, match=rf"header too long: {limit + 1} bytes declared, .* needs at most {limit}"):
        decoder.feed(b"INSITU\x01" + struct.pack("<I", limit + 1))
    # an honest stream passes, also with non-ASCII names and another encoder's spacing
    names = {"w": "wéights→", "b": "b"}
    params = Parameters([names["w"], "b"], [np.ones(3, np.float32), np.array(7, np.int64)])
    specs = params.specs
    assert loads(dumps(params), expected=specs) == params
    head = json.dumps({"entries": [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape)} for s in specs]},
                      indent=1).encode()  # escaped, indented: longer than insitu's own header
    blob = b"INSITU\x01" + struct.pack("<I", len(head)) + head + b"".join(a.tobytes() for a in params.arrays)
    assert loads(blob, expected=specs) == params
