"""Additively homomorphic aggregation (Paillier, via ``phe``) for small cross-silo models: a contrib
building block, not a round protocol of insitu (no ``insitu server`` flag reaches it).

Why it is not in the core: a deployment needs a party other than the server to hold the private key
and decrypt the aggregate. Among insitu's parties only a client can, and it cannot tell the sum it is
asked to decrypt from one client's ciphertext, so a server that deviates learns an individual update;
secure aggregation (``--secure-aggregation``) already hides updates from a semi-honest server without
a key holder, and pure-Python Paillier costs orders of magnitude more per value (bench/he_cost.py).
Use this module where a trusted key holder exists (e.g. one silo of a cross-silo consortium).

Setting: the clients share one Paillier key pair made by a key holder (one silo or a separate
party). Each client encrypts its update; the server only multiplies ciphertexts (which adds the
plaintexts) and never sees a plaintext; the key holder decrypts the aggregate only.

Encoding is insitu's one fixed-point codec (:class:`~insitu.privacy.secagg.encoding.FixedPoint`, the
same as secure aggregation's) with one fixed ``scale`` (not phe's EncodedNumber, whose per-value
exponents make sums slow and sizes variable): ``q = round(clip(x, -clip, clip) * scale)``, with
``clip`` the codec's ``bound``. Weighted FedAvg's ``[w x, w]`` input is
:func:`~insitu.privacy.secagg.encoding.with_weight`, as in secure aggregation.

Precision: each value is off by at most ``0.5 / scale`` after rounding, so a sum of ``n`` updates
is off by at most ``n * 0.5 / scale`` (about ``3e-8 * n`` for ``scale = 2**24``); values beyond
``clip`` are clipped (an error of ``|x| - clip``, not an overflow).

Overflow limits (``C = round(clip * scale)``, ``N`` the public modulus of ``n_length`` bits):

* unpacked (one ciphertext per value): plaintexts are signed residues mod ``N``; a sum of
  ``count`` updates is exact while ``count * C < N / 2``, i.e. about ``2**(n_length - 1) / C``
  clients: never a limit in practice.
* packed (``pack=True``): each value is offset to ``q + C`` in ``[0, 2C]`` (so negatives work) and
  put in a slot of ``k = bit_length(2C * max_clients)`` bits; ``(n_length - 1) // k`` slots share
  one plaintext. A slot sum stays below ``2**k`` (no carry into the next slot) for up to
  ``max_clients`` updates; adding more is refused. With ``scale = 2**24``, ``clip = 1`` and
  ``max_clients = 1024``: ``k = 36``, 56 values per 2048-bit ciphertext.

Wire format (no pickle): ``b"INHE"``, a 4-byte big-endian header length, a UTF-8 JSON header,
then the modulus ``N`` and every ciphertext as fixed-width big-endian integers. Every field is
checked on load; a malformed blob raises ``ValueError``.

Not protected: a key holder colluding with the server can decrypt single updates; no integrity
against malicious clients (any in-range value is accepted); no differential privacy.
"""

from __future__ import annotations

import json
import math
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import phe
    from phe import PaillierPrivateKey, PaillierPublicKey
    from phe.util import (
        powmod,  # gmpy2-backed when gmpy2 is installed (several times faster)
    )
except ImportError as exc:  # pragma: no cover - exercised only without the optional extra
    raise ImportError("insitu.contrib.he needs python-paillier: pip install 'insitu[privacy]'") from exc

from insitu.privacy.secagg.encoding import FixedPoint, split_weighted, with_weight

__all__ = [
    "MIN_N_LENGTH",
    "EncryptedVector",
    "FixedPoint",
    "add_encrypted",
    "decrypt_sum",
    "decrypt_weighted_mean",
    "deserialize_encrypted",
    "encrypt_vector",
    "encrypt_weighted",
    "generate_keypair",
    "serialize_encrypted",
    "sum_encrypted",
]

MIN_N_LENGTH = 1024  # smaller moduli are factorable; refused on keygen and on load
MAX_N_LENGTH = 16384
MAX_LENGTH = 1 << 31  # values per vector accepted on load
MAX_HEADER_BYTES = 4096
MAGIC = b"INHE"
FORMAT_VERSION = 1
_HEADER_KEYS = frozenset(
    {"version", "n_bytes", "ct_bytes", "length", "count", "scale", "clip", "slot_bits", "slots",
     "num_ciphertexts", "weighted"}
)


def generate_keypair(n_length: int = 2048) -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    """Make a Paillier key pair for the key holder; 2048 bits is the usual security level."""
    if not isinstance(n_length, int) or isinstance(n_length, bool):
        raise TypeError(f"n_length must be an int, got {type(n_length).__name__}")
    if not MIN_N_LENGTH <= n_length <= MAX_N_LENGTH:
        raise ValueError(f"n_length must be in [{MIN_N_LENGTH}, {MAX_N_LENGTH}], got {n_length}")
    return phe.generate_paillier_keypair(n_length=n_length)


@dataclass(frozen=True)
class EncryptedVector:
    """Ciphertexts of one update (or of a sum of ``count`` updates) plus the layout to decode them."""

    n: int  # public modulus N
    ciphertexts: tuple[int, ...]
    length: int  # plaintext values (including the weight slot when weighted)
    count: int  # number of client updates summed in
    scale: int
    clip: float
    slot_bits: int  # 0 = unpacked (one value per ciphertext)
    slots: int  # values per ciphertext (1 when unpacked)
    weighted: bool = False  # last value is the client's weight

    @property
    def packed(self) -> bool:
        """Whether several values share one plaintext."""
        return self.slot_bits > 0

    @property
    def offset(self) -> int:
        """C, added to each value before packing so every slot is non-negative."""
        return round(float(self.clip) * self.scale)

    @property
    def capacity(self) -> int:
        """Most updates whose sum still decodes exactly (no slot carry, no wrap mod N)."""
        c = self.offset
        if self.packed:
            return ((1 << self.slot_bits) - 1) // (2 * c)
        return (self.n // 2 - 1) // c

    def to_bytes(self) -> bytes:
        """Serialize without pickle: magic, JSON header, N and ciphertexts as big-endian ints."""
        return serialize_encrypted(self)

    @classmethod
    def from_bytes(cls, blob: bytes, public_key: PaillierPublicKey | None = None) -> EncryptedVector:
        """Parse and validate a blob; with ``public_key``, also require that it was made under it."""
        return deserialize_encrypted(blob, public_key)


# ----------------------------------------------------------------------------------- encryption


class _Encryptor:
    """Paillier encryption of raw ints; with the private key it uses CRT (about 1.5x faster in pure Python)."""

    def __init__(self, public_key: PaillierPublicKey, private_key: PaillierPrivateKey | None) -> None:
        """Precompute the moduli, and the CRT constants if the private key is at hand."""
        if not isinstance(public_key, PaillierPublicKey):
            raise TypeError(f"public_key must be a phe.PaillierPublicKey, got {type(public_key).__name__}")
        self.n = public_key.n
        self.nsq = public_key.nsquare
        self.crt: tuple[int, int, int, int, int] | None = None
        if private_key is not None:
            if not isinstance(private_key, PaillierPrivateKey):
                raise TypeError("private_key must be a phe.PaillierPrivateKey")
            if private_key.public_key.n != self.n:
                raise ValueError("private_key does not belong to public_key")
            p2, q2 = private_key.psquare, private_key.qsquare
            p, q = private_key.p, private_key.q
            # r^N mod p^2 with the exponent reduced mod phi(p^2) = p(p-1); same for q.
            self.crt = (p2, q2, self.n % (p * (p - 1)), self.n % (q * (q - 1)), pow(p2, -1, q2))

    def _obfuscator(self) -> int:
        """r^N mod N^2 for a fresh random unit r."""
        while True:
            r = secrets.randbelow(self.n - 1) + 1
            if math.gcd(r, self.n) == 1:
                break
        if self.crt is None:
            return powmod(r, self.n, self.nsq)
        p2, q2, ep, eq, p2_inv = self.crt
        a = powmod(r % p2, ep, p2)
        b = powmod(r % q2, eq, q2)
        return a + p2 * (((b - a) * p2_inv) % q2)

    def encrypt(self, m: int) -> int:
        """E(m) = (1 + m N) r^N mod N^2 for m taken mod N."""
        return ((1 + (m % self.n) * self.n) * self._obfuscator()) % self.nsq


def _slot_bits(encoder: FixedPoint, max_clients: int) -> int:
    """Bits per packed slot so that max_clients offset values in [0, 2C] sum without carry."""
    return (2 * encoder.max_int * max_clients).bit_length()


def encrypt_vector(
    public_key: PaillierPublicKey,
    vector: Any,
    encoder: FixedPoint,
    *,
    pack: bool = False,
    max_clients: int = 1024,
    private_key: PaillierPrivateKey | None = None,
    _weighted: bool = False,
) -> EncryptedVector:
    """Client side: encode a float vector and encrypt it, one value or one packed slot group per ciphertext.

    ``pack=True`` puts ``(n_length - 1) // k`` values in each plaintext (see module doc); the sum is
    then exact for at most ``max_clients`` updates. ``private_key`` (held by clients in the shared-key
    setting) only speeds encryption up via CRT; the ciphertexts are the same kind.
    """
    if not isinstance(encoder, FixedPoint):
        raise TypeError(f"encoder must be a FixedPoint codec, got {type(encoder).__name__}")
    if not isinstance(max_clients, int) or isinstance(max_clients, bool) or max_clients < 1:
        raise ValueError(f"max_clients must be a positive int, got {max_clients!r}")
    enc = _Encryptor(public_key, private_key)
    q, _ = encoder.quantize(vector)
    if q.size == 0:
        raise ValueError("cannot encode an empty vector")
    n_bits = public_key.n.bit_length()
    c = encoder.max_int
    if not pack:
        if max_clients * c >= public_key.n // 2:
            raise ValueError("max_clients * round(clip * scale) overflows the modulus; use a larger key")
        cts = tuple(enc.encrypt(int(v)) for v in q.tolist())
        return EncryptedVector(public_key.n, cts, int(q.size), 1, encoder.scale, float(encoder.bound),
                               0, 1, _weighted)
    k = _slot_bits(encoder, max_clients)
    slots = (n_bits - 1) // k
    if slots < 1:
        raise ValueError(f"a {k}-bit slot does not fit a {n_bits}-bit modulus; lower scale, clip or max_clients")
    u = (q + c).tolist()  # offset: every slot value in [0, 2C]
    cts_list = []
    for start in range(0, len(u), slots):
        m = 0
        for j, v in enumerate(u[start:start + slots]):
            m |= v << (k * j)
        cts_list.append(enc.encrypt(m))
    return EncryptedVector(public_key.n, tuple(cts_list), len(u), 1, encoder.scale, float(encoder.bound),
                           k, slots, _weighted)


def encrypt_weighted(
    public_key: PaillierPublicKey,
    vector: Any,
    weight: float,
    encoder: FixedPoint,
    *,
    pack: bool = False,
    max_clients: int = 1024,
    private_key: PaillierPrivateKey | None = None,
) -> EncryptedVector:
    """Client side of weighted FedAvg: encrypt ``weight * vector`` and ``weight`` as one extra value.

    ``weight`` must lie in (0, clip] (normalise it, e.g. n_samples / max_samples) so it is never
    clipped; ``weight * vector`` is clipped to [-clip, clip] like any value.
    """
    w = float(weight)
    if not (math.isfinite(w) and 0 < w <= float(encoder.bound)):
        raise ValueError(f"weight must be in (0, clip={encoder.bound}], got {weight!r}")
    return encrypt_vector(public_key, with_weight(vector, w), encoder, pack=pack,
                          max_clients=max_clients, private_key=private_key, _weighted=True)


# ------------------------------------------------------------------------------------- server


def _check_compatible(a: EncryptedVector, b: EncryptedVector) -> None:
    """Refuse to add updates made under another key or with another layout."""
    if not isinstance(a, EncryptedVector) or not isinstance(b, EncryptedVector):
        raise TypeError("add_encrypted expects EncryptedVector operands")
    if a.n != b.n:
        raise ValueError("ciphertexts are under different public keys")
    for field in ("length", "scale", "clip", "slot_bits", "slots", "weighted"):
        if getattr(a, field) != getattr(b, field):
            raise ValueError(f"encrypted vectors differ in {field}: {getattr(a, field)!r} != {getattr(b, field)!r}")
    if len(a.ciphertexts) != len(b.ciphertexts):
        raise ValueError("encrypted vectors hold different numbers of ciphertexts")


def add_encrypted(a: EncryptedVector, b: EncryptedVector) -> EncryptedVector:
    """Server side: homomorphic sum of two encrypted updates (ciphertext products mod N^2)."""
    _check_compatible(a, b)
    count = a.count + b.count
    if count > a.capacity:
        raise ValueError(f"sum of {count} updates exceeds this layout's capacity of {a.capacity} (slot overflow)")
    nsq = a.n * a.n
    cts = tuple((x * y) % nsq for x, y in zip(a.ciphertexts, b.ciphertexts))
    return EncryptedVector(a.n, cts, a.length, count, a.scale, a.clip, a.slot_bits, a.slots, a.weighted)


def sum_encrypted(updates: Sequence[EncryptedVector]) -> EncryptedVector:
    """Server side: homomorphic sum of a non-empty list of encrypted updates."""
    updates = list(updates)
    if not updates:
        raise ValueError("sum_encrypted needs at least one update")
    first = updates[0]
    for u in updates[1:]:
        _check_compatible(first, u)
    count = sum(u.count for u in updates)
    if count > first.capacity:
        raise ValueError(f"sum of {count} updates exceeds this layout's capacity of {first.capacity} (slot overflow)")
    nsq = first.n * first.n
    acc = list(first.ciphertexts)
    for u in updates[1:]:
        acc = [(x * y) % nsq for x, y in zip(acc, u.ciphertexts)]
    return EncryptedVector(first.n, tuple(acc), first.length, count, first.scale, first.clip,
                           first.slot_bits, first.slots, first.weighted)


# ---------------------------------------------------------------------------------- key holder


def _decrypt_ints(private_key: PaillierPrivateKey, enc: EncryptedVector, encoder: FixedPoint,
                  count: int | None) -> list[int]:
    """Decrypt to the summed fixed-point ints, checking key, encoder, count and ranges."""
    if not isinstance(private_key, PaillierPrivateKey):
        raise TypeError(f"private_key must be a phe.PaillierPrivateKey, got {type(private_key).__name__}")
    if not isinstance(enc, EncryptedVector):
        raise TypeError(f"enc must be an EncryptedVector, got {type(enc).__name__}")
    if private_key.public_key.n != enc.n:
        raise ValueError("ciphertexts were made under another public key")
    if encoder.scale != enc.scale or float(encoder.bound) != enc.clip:
        raise ValueError(f"encoder (scale={encoder.scale}, clip={encoder.bound}) does not match the "
                         f"ciphertexts (scale={enc.scale}, clip={enc.clip})")
    if count is None:
        count = enc.count
    if count != enc.count:
        raise ValueError(f"expected a sum of {count} updates, the ciphertexts hold {enc.count}")
    n = enc.n
    bound = count * enc.offset
    out: list[int] = []
    if not enc.packed:
        for ct in enc.ciphertexts:
            m = private_key.raw_decrypt(ct)
            v = m - n if m > n // 2 else m
            if abs(v) > bound:
                raise ValueError("decrypted value out of range: overflow or tampered ciphertext")
            out.append(v)
        return out
    k, mask = enc.slot_bits, (1 << enc.slot_bits) - 1
    remaining = enc.length
    for ct in enc.ciphertexts:
        m = private_key.raw_decrypt(ct)
        take = min(enc.slots, remaining)
        if m >> (k * take):
            raise ValueError("decrypted plaintext has bits beyond its slots: overflow or tampered ciphertext")
        for j in range(take):
            v = ((m >> (k * j)) & mask) - bound
            if abs(v) > bound:
                raise ValueError("decrypted slot out of range: overflow or tampered ciphertext")
            out.append(v)
        remaining -= take
    return out


def decrypt_sum(private_key: PaillierPrivateKey, enc: EncryptedVector, encoder: FixedPoint,
                count: int | None = None) -> np.ndarray:
    """Key holder: decrypt the aggregate of ``count`` updates to the plain float64 sum."""
    return encoder.dequantize(_decrypt_ints(private_key, enc, encoder, count))


def decrypt_weighted_mean(private_key: PaillierPrivateKey, enc: EncryptedVector, encoder: FixedPoint,
                          count: int | None = None) -> np.ndarray:
    """Key holder: weighted FedAvg result, sum(w_i x_i) / sum(w_i), from an encrypted weighted sum."""
    if not enc.weighted:
        raise ValueError("ciphertexts were not made with encrypt_weighted")
    return split_weighted(decrypt_sum(private_key, enc, encoder, count))


# ------------------------------------------------------------------------------- serialization


def serialize_encrypted(enc: EncryptedVector) -> bytes:
    """Encode an EncryptedVector: MAGIC, u32 header length, JSON header, N, ciphertexts (big-endian)."""
    n_bytes = (enc.n.bit_length() + 7) // 8
    ct_bytes = ((enc.n * enc.n).bit_length() + 7) // 8
    header = {
        "version": FORMAT_VERSION, "n_bytes": n_bytes, "ct_bytes": ct_bytes, "length": enc.length,
        "count": enc.count, "scale": enc.scale, "clip": float(enc.clip), "slot_bits": enc.slot_bits,
        "slots": enc.slots, "num_ciphertexts": len(enc.ciphertexts), "weighted": bool(enc.weighted),
    }
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    body = b"".join(c.to_bytes(ct_bytes, "big") for c in enc.ciphertexts)
    return MAGIC + struct.pack(">I", len(hb)) + hb + enc.n.to_bytes(n_bytes, "big") + body


def _int_field(h: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """Fetch a header int (not bool) and check lo <= value <= hi."""
    v = h[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"header field {key!r} must be an int, got {type(v).__name__}")  # noqa: TRY004
    if not lo <= v <= hi:
        raise ValueError(f"header field {key!r}={v} out of range [{lo}, {hi}]")
    return v


def deserialize_encrypted(blob: bytes, public_key: PaillierPublicKey | None = None) -> EncryptedVector:
    """Parse a blob from serialize_encrypted, validating every field; raise ValueError if malformed."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < 8 or blob[:4] != MAGIC:
        raise ValueError("not an encrypted-vector blob (bad magic)")
    (hlen,) = struct.unpack(">I", blob[4:8])
    if not 2 <= hlen <= MAX_HEADER_BYTES or 8 + hlen > len(blob):
        raise ValueError(f"bad header length {hlen}")
    try:
        h = json.loads(blob[8:8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not valid JSON: {exc}") from None
    if not isinstance(h, dict) or set(h) != _HEADER_KEYS:
        got = sorted(h) if isinstance(h, dict) else type(h).__name__
        raise ValueError(f"header must have exactly the keys {sorted(_HEADER_KEYS)}, got {got}")
    if _int_field(h, "version", 0, 2**31) != FORMAT_VERSION:
        raise ValueError(f"unsupported format version {h['version']}")
    n_bytes = _int_field(h, "n_bytes", (MIN_N_LENGTH + 7) // 8, MAX_N_LENGTH // 8)
    ct_bytes = _int_field(h, "ct_bytes", 1, 2 * MAX_N_LENGTH // 8)
    length = _int_field(h, "length", 1, MAX_LENGTH)
    count = _int_field(h, "count", 1, 2**62)
    scale = _int_field(h, "scale", 1, 2**52)
    slot_bits = _int_field(h, "slot_bits", 0, MAX_N_LENGTH)
    slots = _int_field(h, "slots", 1, MAX_N_LENGTH)
    num_ct = _int_field(h, "num_ciphertexts", 1, MAX_LENGTH)
    clip = h["clip"]
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not math.isfinite(clip) or clip <= 0:
        raise ValueError(f"header field 'clip' must be a finite number > 0, got {clip!r}")
    if not isinstance(h["weighted"], bool):
        raise ValueError("header field 'weighted' must be a bool")  # noqa: TRY004
    try:
        encoder = FixedPoint(scale, float(clip))
    except ValueError as exc:
        raise ValueError(f"bad scale/clip in header: {exc}") from None
    # Modulus.
    start = 8 + hlen
    if len(blob) < start + n_bytes:
        raise ValueError("blob truncated inside the public modulus")
    n = int.from_bytes(blob[start:start + n_bytes], "big")
    n_bits = n.bit_length()
    if (n_bits + 7) // 8 != n_bytes or not MIN_N_LENGTH <= n_bits <= MAX_N_LENGTH or n % 2 == 0:
        raise ValueError(f"public modulus is malformed ({n_bits} bits, n_bytes={n_bytes})")
    if public_key is not None and public_key.n != n:
        raise ValueError("ciphertexts were made under another public key")
    nsq = n * n
    if ct_bytes != (nsq.bit_length() + 7) // 8:
        raise ValueError(f"ct_bytes={ct_bytes} does not match a {n_bits}-bit modulus")
    # Layout.
    if slot_bits == 0:
        if slots != 1:
            raise ValueError("unpacked layout must have slots == 1")
    else:
        if slot_bits < (2 * encoder.max_int).bit_length():
            raise ValueError(f"slot_bits={slot_bits} too small for scale and clip")
        if slots != (n_bits - 1) // slot_bits:
            raise ValueError(f"slots={slots} does not match slot_bits={slot_bits} and a {n_bits}-bit modulus")
    if num_ct != -(-length // slots):
        raise ValueError(f"num_ciphertexts={num_ct} does not match length={length} and slots={slots}")
    expected = start + n_bytes + num_ct * ct_bytes
    if len(blob) != expected:
        raise ValueError(f"blob is {len(blob)} bytes, layout says {expected}")
    # Ciphertexts.
    pos = start + n_bytes
    cts = []
    for i in range(num_ct):
        c = int.from_bytes(blob[pos:pos + ct_bytes], "big")
        pos += ct_bytes
        if not 0 < c < nsq or math.gcd(c, n) != 1:
            raise ValueError(f"ciphertext {i} is not a unit mod N^2")
        cts.append(c)
    enc = EncryptedVector(n, tuple(cts), length, count, scale, float(clip), slot_bits, slots, h["weighted"])
    if count > enc.capacity:
        raise ValueError(f"count={count} exceeds the layout's capacity of {enc.capacity}")
    return enc
