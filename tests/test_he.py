"""Paillier aggregation: sums, packing, weighted mean, wire format and the server's view."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from insitu.contrib.he import (
    EncryptedVector,
    FixedPoint,
    add_encrypted,
    decrypt_sum,
    decrypt_weighted_mean,
    deserialize_encrypted,
    encrypt_vector,
    encrypt_weighted,
    generate_keypair,
    serialize_encrypted,
    sum_encrypted,
)

N_LENGTH = 1024  # smallest accepted; keeps pure-Python Paillier fast enough for tests
D = 200
CLIENTS = 5


@pytest.fixture(scope="module")
def keys():
    return generate_keypair(N_LENGTH)


@pytest.fixture(scope="module")
def other_keys():
    return generate_keypair(N_LENGTH)


@pytest.fixture(scope="module")
def encoder() -> FixedPoint:
    return FixedPoint(scale=2**24, bound=1.0)


@pytest.fixture(scope="module")
def client_vectors() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-1.0, 1.0, D).astype(np.float32) for _ in range(CLIENTS)]


@pytest.fixture(scope="module")
def packed_updates(keys, encoder, client_vectors) -> list[EncryptedVector]:
    pk, _ = keys
    return [encrypt_vector(pk, x, encoder, pack=True, max_clients=16) for x in client_vectors]


@pytest.fixture(scope="module")
def unpacked_updates(keys, encoder, client_vectors) -> list[EncryptedVector]:
    pk, sk = keys  # the clients share the key pair: CRT encryption with the private key is faster
    return [encrypt_vector(pk, x, encoder, private_key=sk) for x in client_vectors]


def _tol(encoder: FixedPoint, n: int) -> float:
    return n * encoder.resolution + 1e-12


def test_sum_of_clients_packed(keys, encoder, client_vectors, packed_updates):
    _, sk = keys
    agg = sum_encrypted(packed_updates)
    assert agg.count == CLIENTS and agg.packed and len(agg.ciphertexts) < D // 10
    out = decrypt_sum(sk, agg, encoder, CLIENTS)
    plain = np.sum([x.astype(np.float64) for x in client_vectors], axis=0)
    assert out.shape == (D,)
    assert np.max(np.abs(out - plain)) <= _tol(encoder, CLIENTS)
    assert (plain < 0).any()  # negative sums come back negative


def test_packing_on_off_same_result(keys, encoder, packed_updates, unpacked_updates):
    _, sk = keys
    a = decrypt_sum(sk, sum_encrypted(packed_updates), encoder, CLIENTS)
    b = decrypt_sum(sk, sum_encrypted(unpacked_updates), encoder, CLIENTS)
    assert len(unpacked_updates[0].ciphertexts) == D
    np.testing.assert_array_equal(a, b)  # identical fixed-point ints


def test_add_encrypted_matches_sum(keys, encoder, packed_updates):
    _, sk = keys
    acc = packed_updates[0]
    for u in packed_updates[1:]:
        acc = add_encrypted(acc, u)
    np.testing.assert_array_equal(decrypt_sum(sk, acc, encoder),
                                  decrypt_sum(sk, sum_encrypted(packed_updates), encoder))


@pytest.mark.parametrize("pack", [False, True])
def test_negative_values_and_clipping(keys, encoder, pack):
    pk, sk = keys
    x = np.array([-1.0, -0.5, -1e-7, 0.0, 0.25, 1.0, -3.0, 7.0], dtype=np.float32)
    enc = encrypt_vector(pk, x, encoder, pack=pack, max_clients=4)
    agg = sum_encrypted([enc, enc, enc])
    out = decrypt_sum(sk, agg, encoder, 3)
    expected = 3 * np.clip(x.astype(np.float64), -1, 1)
    assert np.max(np.abs(out - expected)) <= _tol(encoder, 3)
    assert out[-2] == -3.0 and out[-1] == 3.0


def test_weighted_mean(keys, encoder):
    pk, sk = keys
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-1, 1, 30) for _ in range(4)]
    ws = [0.1, 0.4, 1.0, 0.25]
    encs = [encrypt_weighted(pk, x, w, encoder, pack=True, max_clients=8) for x, w in zip(xs, ws)]
    out = decrypt_weighted_mean(sk, sum_encrypted(encs), encoder, 4)
    expected = np.sum([w * x for w, x in zip(ws, xs)], axis=0) / sum(ws)
    assert np.max(np.abs(out - expected)) < 1e-6
    with pytest.raises(ValueError, match="weight"):
        encrypt_weighted(pk, xs[0], 2.0, encoder)  # would be clipped: refused
    with pytest.raises(ValueError, match="encrypt_weighted"):
        decrypt_weighted_mean(sk, encrypt_vector(pk, xs[0], encoder, pack=True), encoder)


def test_capacity_overflow_refused(keys, encoder):
    pk, _ = keys
    enc = encrypt_vector(pk, np.ones(5), encoder, pack=True, max_clients=2)
    assert enc.capacity >= 2
    with pytest.raises(ValueError, match="capacity"):
        sum_encrypted([enc] * (enc.capacity + 1))


@pytest.mark.parametrize("fixture", ["packed_updates", "unpacked_updates"])
def test_serialization_round_trip(request, keys, encoder, fixture):
    pk, sk = keys
    agg = sum_encrypted(request.getfixturevalue(fixture)[:2])
    blob = agg.to_bytes()
    back = EncryptedVector.from_bytes(blob, pk)
    assert back == agg
    assert serialize_encrypted(back) == blob
    np.testing.assert_array_equal(decrypt_sum(sk, back, encoder, 2), decrypt_sum(sk, agg, encoder, 2))


def _split(blob: bytes) -> tuple[dict, bytes]:
    (hlen,) = struct.unpack(">I", blob[4:8])
    return json.loads(blob[8:8 + hlen]), blob[8 + hlen:]


def _join(header: dict, rest: bytes) -> bytes:
    hb = json.dumps(header).encode()
    return b"INHE" + struct.pack(">I", len(hb)) + hb + rest


def test_malformed_blobs_refused(packed_updates):
    blob = packed_updates[0].to_bytes()
    h, rest = _split(blob)
    n_bytes, ct_bytes = h["n_bytes"], h["ct_bytes"]
    bad: list[bytes] = [
        b"", b"INHE", b"XXXX" + blob[4:], blob[:-1], blob + b"\0",
        blob[:4] + struct.pack(">I", 10**6) + blob[8:],
        blob[:8] + b"[" + blob[9:],
        _join({**h, "extra": 1}, rest),
        _join({k: v for k, v in h.items() if k != "count"}, rest),
        _join({**h, "version": 2}, rest),
        _join({**h, "length": h["length"] + 1000}, rest),
        _join({**h, "length": "200"}, rest),
        _join({**h, "count": 0}, rest),
        _join({**h, "count": True}, rest),
        _join({**h, "count": 10**9}, rest),
        _join({**h, "slots": h["slots"] + 1}, rest),
        _join({**h, "slot_bits": 3}, rest),
        _join({**h, "clip": float("nan")}, rest),
        _join({**h, "clip": -1.0}, rest),
        _join({**h, "scale": 0}, rest),
        _join({**h, "weighted": 1}, rest),
        _join({**h, "ct_bytes": ct_bytes + 1}, rest),
        _join(h, bytes(n_bytes) + rest[n_bytes:]),  # zero modulus
        _join(h, rest[:n_bytes - 1] + bytes([rest[n_bytes - 1] & 0xFE]) + rest[n_bytes:]),  # even N
        _join(h, rest[:n_bytes] + bytes(ct_bytes) + rest[n_bytes + ct_bytes:]),  # zero ciphertext
        _join(h, rest[:n_bytes] + b"\xff" * ct_bytes + rest[n_bytes + ct_bytes:]),  # >= N^2
        _join(h, rest[:n_bytes] + rest[:n_bytes].rjust(ct_bytes, b"\0") + rest[n_bytes + ct_bytes:]),  # c = N
    ]
    for i, b in enumerate(bad):
        with pytest.raises(ValueError):
            deserialize_encrypted(b)
            pytest.fail(f"malformed blob #{i} accepted")
    with pytest.raises(TypeError):
        deserialize_encrypted("not bytes")  # type: ignore[arg-type]


def test_other_public_key_refused(keys, other_keys, encoder, packed_updates):
    _, sk = keys
    pk2, sk2 = other_keys
    foreign = encrypt_vector(pk2, np.zeros(D), encoder, pack=True, max_clients=16)
    with pytest.raises(ValueError, match="different public keys"):
        add_encrypted(packed_updates[0], foreign)
    with pytest.raises(ValueError, match="different public keys"):
        sum_encrypted([packed_updates[0], foreign])
    with pytest.raises(ValueError, match="another public key"):
        EncryptedVector.from_bytes(foreign.to_bytes(), keys[0])
    with pytest.raises(ValueError, match="another public key"):
        decrypt_sum(sk2, packed_updates[0], encoder)
    with pytest.raises(ValueError, match="another public key"):
        decrypt_sum(sk, foreign, encoder)


def test_layout_and_encoder_mismatch_refused(keys, encoder, packed_updates, unpacked_updates):
    _, sk = keys
    with pytest.raises(ValueError, match="differ"):
        add_encrypted(packed_updates[0], unpacked_updates[0])
    with pytest.raises(ValueError, match="encoder"):
        decrypt_sum(sk, packed_updates[0], FixedPoint(scale=2**20, bound=1.0))
    with pytest.raises(ValueError, match="expected a sum of 3"):
        decrypt_sum(sk, sum_encrypted(packed_updates[:2]), encoder, 3)


def test_server_view_is_ciphertext_only(keys, encoder):
    pk, sk = keys
    x = np.full(40, 0.5, dtype=np.float32)  # a very recognisable plaintext
    for pack in (False, True):
        enc = encrypt_vector(pk, x, encoder, pack=pack, max_clients=16)
        blob = enc.to_bytes()
        q = int(0.5 * encoder.scale)
        for needle in (x.tobytes(), np.float64(0.5).tobytes(), q.to_bytes(4, "big"),
                       (q + encoder.max_int).to_bytes(4, "big"), q.to_bytes(4, "little")):
            assert needle not in blob
        assert len(set(enc.ciphertexts)) == len(enc.ciphertexts)  # randomised: equal values, distinct cts
        # Everything the server holds: no private factors, and decrypting needs a PaillierPrivateKey.
        assert not any(hasattr(enc, a) for a in ("p", "q", "private_key"))
        with pytest.raises(TypeError):
            decrypt_sum(pk, enc, encoder)  # type: ignore[arg-type]
        np.testing.assert_allclose(decrypt_sum(sk, enc, encoder), x, atol=encoder.resolution)
    # Same plaintext, two encryptions: different ciphertexts (semantic security).
    a = encrypt_vector(pk, x[:3], encoder)
    b = encrypt_vector(pk, x[:3], encoder)
    assert set(a.ciphertexts).isdisjoint(b.ciphertexts)


def test_bad_inputs(keys, encoder):
    pk, _ = keys
    with pytest.raises(ValueError):
        encrypt_vector(pk, np.array([np.nan]), encoder)
    with pytest.raises(ValueError):
        encrypt_vector(pk, np.array([]), encoder)
    with pytest.raises(ValueError):
        FixedPoint(scale=0, bound=1.0)
    with pytest.raises(ValueError):
        FixedPoint(scale=2**40, bound=2**20)
    with pytest.raises(ValueError):
        generate_keypair(512)
    with pytest.raises(ValueError):
        sum_encrypted([])
