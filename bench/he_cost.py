"""Benchmark (not a test): cost of Paillier aggregation (insitu.contrib.he) per client and per round.

For each model size D and with/without packing, at one key length (default 2048 bits):

* client encryption time, with the public key only and with the shared key pair (CRT);
* server time to add one client's encrypted update into the running sum;
* key-holder decryption time of the aggregate (once per round);
* bytes per client update (serialized) against 4*D bytes of plain float32.

Encryption and decryption are timed in full when the projection from a sample of ciphertexts fits
``--budget`` seconds; otherwise the sample's per-ciphertext time is multiplied by the ciphertext
count and the row is marked ``~`` (extrapolated). Every ciphertext costs the same (one modular
exponentiation), so the extrapolation is linear and tight. Sizes and server additions are always
measured on a full-size vector (tiled from the sample when extrapolated).

    python bench/he_cost.py [--quick] [--dims 1000 10000 100000] [--n-length 2048] [--budget 20]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np

from insitu.contrib.he import (
    EncryptedVector,
    FixedPoint,
    add_encrypted,
    decrypt_sum,
    encrypt_vector,
    generate_keypair,
)

SAMPLE_CTS = 12  # ciphertexts timed when a full run would exceed the budget
MAX_CLIENTS = 1024


def timed(fn, *args, **kwargs):
    """Run fn once; return (result, seconds)."""
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def fmt_s(seconds: float, extrapolated: bool) -> str:
    """Seconds with a ~ mark when extrapolated."""
    mark = "~" if extrapolated else ""
    if seconds < 1e-2:
        return f"{mark}{seconds * 1e3:.2f} ms"
    return f"{mark}{seconds:.2f} s"


def measure(pk, sk, enc: FixedPoint, d: int, pack: bool, budget: float, rng) -> dict:
    """Time one configuration; extrapolate encryption/decryption from a sample when over budget."""
    x = rng.uniform(-1.0, 1.0, d).astype(np.float32)
    probe = encrypt_vector(pk, x[:1], enc, pack=pack, max_clients=MAX_CLIENTS)
    slots = probe.slots
    num_ct = math.ceil(d / slots)
    sample_vals = min(d, SAMPLE_CTS * slots)
    sample, t_pub = timed(encrypt_vector, pk, x[:sample_vals], enc, pack=pack, max_clients=MAX_CLIENTS)
    per_ct_pub = t_pub / len(sample.ciphertexts)
    _, t_crt = timed(encrypt_vector, pk, x[:sample_vals], enc, pack=pack, max_clients=MAX_CLIENTS,
                     private_key=sk)
    per_ct_crt = t_crt / len(sample.ciphertexts)

    enc_extrap = per_ct_pub * num_ct > budget
    if enc_extrap:
        reps = -(-num_ct // len(sample.ciphertexts))
        cts = (sample.ciphertexts * reps)[:num_ct]
        full = EncryptedVector(sample.n, cts, d, 1, sample.scale, sample.clip, sample.slot_bits,
                               sample.slots, False)
        enc_s = per_ct_pub * num_ct
    else:
        full, enc_s = timed(encrypt_vector, pk, x, enc, pack=pack, max_clients=MAX_CLIENTS)
    enc_crt_s = per_ct_crt * num_ct

    # Server: fold one update into a running sum (a few repeats, best of).
    adds = []
    acc = full
    for _ in range(3):
        acc, t = timed(add_encrypted, acc, full)
        adds.append(t)
    add_s = min(adds)

    # Key holder: decrypt the aggregate (here a sum of 4 updates).
    dec_extrap = False
    _, t_dec_sample = timed(decrypt_sum, sk, add_encrypted(sample, sample), enc, 2)
    per_ct_dec = t_dec_sample / len(sample.ciphertexts)
    if per_ct_dec * num_ct > budget or enc_extrap:
        dec_extrap = True
        dec_s = per_ct_dec * num_ct
    else:
        out, dec_s = timed(decrypt_sum, sk, acc, enc, acc.count)
        err = np.max(np.abs(out - acc.count * x.astype(np.float64)))
        assert err <= acc.count * enc.resolution + 1e-12, err

    nbytes = len(full.to_bytes())
    return {
        "d": d, "pack": pack, "slots": slots, "num_ct": num_ct, "enc_s": enc_s, "enc_extrap": enc_extrap,
        "enc_crt_s": enc_crt_s, "add_s": add_s, "dec_s": dec_s, "dec_extrap": dec_extrap,
        "bytes": nbytes, "plain": 4 * d,
    }


def main() -> None:
    """Parse arguments, run the grid, print a table and a practicality line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--n-length", type=int, default=2048)
    ap.add_argument("--budget", type=float, default=20.0, help="max seconds to time one phase in full")
    ap.add_argument("--quick", action="store_true", help="D=1000 only, short budget")
    args = ap.parse_args()
    if args.quick:
        args.dims, args.budget = [1_000], 3.0

    enc = FixedPoint(scale=2**24, bound=1.0)
    (pk, sk), t_key = timed(generate_keypair, args.n_length)
    rng = np.random.default_rng(0)
    try:
        import gmpy2  # noqa: F401
        backend = "gmpy2"
    except ImportError:
        backend = "pure-Python pow (no gmpy2)"
    print(f"# Paillier cost: n_length={args.n_length}, scale=2**24, clip=1.0, packing max_clients={MAX_CLIENTS}")
    print(f"# {platform.python_implementation()} {platform.python_version()}, {backend}, keygen {t_key:.2f} s; "
          f"~ = extrapolated from {SAMPLE_CTS} ciphertexts")
    print()
    print("| D | packing | values/ct | ciphertexts | client encrypt (public key) | client encrypt (shared key, CRT) "
          "| server add / client | decrypt aggregate | bytes / client | vs 4*D plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for d in args.dims:
        for pack in (False, True):
            r = measure(pk, sk, enc, d, pack, args.budget, rng)
            rows.append(r)
            print(f"| {d:,} | {'on' if pack else 'off'} | {r['slots']} | {r['num_ct']:,} "
                  f"| {fmt_s(r['enc_s'], r['enc_extrap'])} | ~{fmt_s(r['enc_crt_s'], False)} "
                  f"| {fmt_s(r['add_s'], False)} | {fmt_s(r['dec_s'], r['dec_extrap'])} "
                  f"| {r['bytes']:,} | {r['bytes'] / r['plain']:.1f}x |", flush=True)
    print()
    for r in rows:
        if r["pack"]:
            print(f"Practical: a {r['d']:,}-parameter model (e.g. logistic regression) costs "
                  f"{r['enc_crt_s']:.1f}-{r['enc_s']:.1f} s of encryption per client per round (one core), "
                  f"{r['add_s'] * 1e3:.1f} ms of server work per client, {r['dec_s']:.1f} s to decrypt the "
                  f"aggregate, and {r['bytes'] / 1e6:.2f} MB upload ({r['bytes'] / r['plain']:.1f}x plain).")


if __name__ == "__main__":
    main()
