"""Secure aggregation (insitu.privacy.secagg): Shamir, fixed point, full rounds, dropouts, privacy, bad input."""

from __future__ import annotations

import dataclasses
import itertools
import logging

import numpy as np
import pytest
from scipy import stats

from insitu.privacy.secagg import (
    MODULUS,
    FixedPoint,
    MaskedInput,
    RevealedShare,
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggRefused,
    SecAggServer,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    from_field,
    run_round,
    split_weighted,
    to_field,
    wire_size,
    with_weight,
)
from insitu.privacy.secagg.prg import expand
from insitu.privacy.secagg.shamir import PRIME, reconstruct, reconstruct_bytes, share, share_bytes

N, T, D, B = 10, 6, 1000, 1.0


@pytest.fixture(scope="module")
def config() -> SecAggConfig:
    return SecAggConfig(n=N, t=T, dim=D, bound=B, session=7)


@pytest.fixture(scope="module")
def inputs(config: SecAggConfig) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {c: rng.uniform(-B, B, D).astype(np.float32) for c in config.client_ids}


def plain_sum(inputs: dict[int, np.ndarray], ids) -> np.ndarray:
    return np.sum([inputs[c].astype(np.float64) for c in ids], axis=0)


def assert_sum(report, inputs, config, expected_ids) -> None:
    assert report.included == tuple(sorted(expected_ids))
    err = np.abs(report.total - plain_sum(inputs, expected_ids)).max()
    assert err <= config.fixed_point.max_abs_error


def replace_from(stage_wanted: str, client: int, fn):
    """A tamper hook that rewrites one client's message at one stage."""

    def tamper(stage, msgs):
        if stage != stage_wanted:
            return msgs
        return [fn(m) if getattr(m, "client_id", None) == client else m for m in msgs]

    return tamper


# --- Shamir ---------------------------------------------------------------------------------------


def test_shamir_any_t_reconstruct_and_t_minus_1_do_not() -> None:
    secret, n, t = 123456789 * 2**200 + 17, 6, 4
    shares = share(secret, list(range(1, n + 1)), t)
    for subset in itertools.combinations(shares, t):
        assert reconstruct({x: shares[x] for x in subset}) == secret
    for subset in itertools.combinations(shares, t - 1):
        assert reconstruct({x: shares[x] for x in subset}) != secret
    assert reconstruct(shares) == secret  # more than t is fine too


def test_shamir_bytes_round_trip_and_malformed_share() -> None:
    secret = bytes(range(32))
    shares = share_bytes(secret, [1, 2, 3, 4, 5], 3)
    assert all(len(s) == 66 for s in shares.values())
    assert reconstruct_bytes({x: shares[x] for x in (2, 4, 5)}, 32) == secret
    with pytest.raises(ValueError, match="66 bytes"):
        reconstruct_bytes({1: shares[1][:-1], 2: shares[2], 3: shares[3]}, 32)
    with pytest.raises(ValueError):
        share(PRIME, [1, 2], 2)


def test_prg_is_deterministic_and_seed_dependent() -> None:
    a, b = expand(b"\x01" * 32, 1000), expand(b"\x02" * 32, 1000)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    assert np.array_equal(a, expand(b"\x01" * 32, 1000)) and not np.array_equal(a, b)


# --- fixed point ----------------------------------------------------------------------------------


def test_fixed_point_round_trip_and_clipping() -> None:
    fp = FixedPoint.for_sum(10, 2.0)
    assert fp.scale == (2**31 - 1) // 20
    x = np.array([-2.0, -1.234567, 0.0, 0.5, 1.99999], dtype=np.float64)
    enc, clipped = fp.encode(x)
    assert enc.dtype == np.uint32 and clipped == 0
    assert np.abs(fp.decode(enc) - x).max() <= 1 / (2 * fp.scale)
    enc, clipped = fp.encode(np.array([3.0, -5.0, 1.0]))
    assert clipped == 2
    assert np.allclose(fp.decode(enc), [2.0, -2.0, 1.0], atol=1 / fp.scale)
    with pytest.raises(ValueError, match="NaN"):
        fp.encode(np.array([np.nan]))


@pytest.mark.parametrize(("n", "bound"), [(10, 1.0), (7, 0.3), (100, 5.0), (1000, 1e-3)])
def test_fixed_point_extremes_do_not_overflow(n: int, bound: float) -> None:
    fp = FixedPoint.for_sum(n, bound)
    for sign in (1.0, -1.0):
        enc, _ = fp.encode(np.full(4, sign * bound))
        total = np.zeros(4, dtype=np.uint32)
        for _ in range(n):
            total += enc
        assert np.all(np.abs(fp.decode_sum(total) - sign * n * bound) <= fp.max_abs_error)


def test_one_codec_quantizes_at_any_scale_and_reads_sums_back_from_the_field() -> None:
    codec = FixedPoint(scale=4, bound=1.0)  # Paillier's use: a scale of its own
    ints, clipped = codec.quantize([0.3, -2.0, 0.125, 1.0])
    assert ints.tolist() == [1, -4, 0, 4] and clipped == 1  # rint(1.2), clipped to -1, rint(0.5) = 0, 4
    assert codec.dequantize(ints).tolist() == [0.25, -1.0, 0.0, 1.0]
    assert codec.resolution == 0.125 and codec.max_int == 4
    # distributed DP's integers cross the field exactly, negatives included
    assert from_field(to_field([-5, 7]) + to_field([2, -9])).tolist() == [-3, -2]
    # [w x, w]: one sum gives the weighted mean, (1 [1, 2] + 3 [3, 0]) / 4
    assert split_weighted(with_weight([1.0, 2.0], 1.0) + with_weight([3.0, 0.0], 3.0)).tolist() == [2.5, 0.5]
    with pytest.raises(ValueError, match="2\\*\\*52"):
        FixedPoint(scale=2**40, bound=2.0**20)
    with pytest.raises(TypeError, match="scale must be an int"):
        FixedPoint(scale=1.5, bound=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only integers"):
        to_field(np.array([0.5]))


def test_fixed_point_refuses_bounds_without_precision() -> None:
    with pytest.raises(ValueError, match="precision"):
        FixedPoint.for_sum(1000, 1e7)


# --- configuration --------------------------------------------------------------------------------


def test_config_refuses_low_or_excessive_threshold() -> None:
    with pytest.raises(ValueError, match=r"threshold t=5 must exceed half the clients \(n/2=5\)"):
        SecAggConfig(n=10, t=5, dim=3, bound=1.0)
    with pytest.raises(ValueError, match="exceeds"):
        SecAggConfig(n=10, t=11, dim=3, bound=1.0)
    with pytest.raises(ValueError, match="degree"):
        SecAggConfig(n=10, t=3, dim=3, bound=1.0, degree=3)


# --- full rounds ----------------------------------------------------------------------------------


def test_full_round_matches_plain_sum(config, inputs) -> None:
    report = run_round(config, inputs)
    assert_sum(report, inputs, config, config.client_ids)
    assert report.server.excluded == {}
    assert set(report.server.reconstructed.values()) == {"seed"}
    assert wire_size(MaskedInput(1, bytes(4 * D))) == 4 + 4 + 4 * D


def test_dropouts_before_masked_input_are_excluded_from_the_sum(config, inputs) -> None:
    report = run_round(config, inputs, drop_before={"masked": [2, 5, 9]})
    assert_sum(report, inputs, config, set(config.client_ids) - {2, 5, 9})
    rec = report.server.reconstructed
    assert {c for c, kind in rec.items() if kind == "key"} == {2, 5, 9}


def test_dropouts_after_masked_input_are_still_in_the_sum(config, inputs) -> None:
    report = run_round(config, inputs, drop_before={"unmask": [1, 4, 8]})
    assert_sum(report, inputs, config, config.client_ids)
    assert set(report.server.reconstructed.values()) == {"seed"}


def test_mixed_dropouts_at_every_stage() -> None:
    cfg = SecAggConfig(n=12, t=7, dim=50, bound=3.0)
    rng = np.random.default_rng(1)
    xs = {c: rng.uniform(-3, 3, 50) for c in cfg.client_ids}
    report = run_round(cfg, xs, drop_before={"advertise": [1], "share": [2], "masked": [3], "unmask": [4]})
    assert_sum(report, xs, cfg, set(cfg.client_ids) - {1, 2, 3})


@pytest.mark.parametrize("stage", ["masked", "unmask"])
def test_too_many_dropouts_abort_without_revealing(config, inputs, stage) -> None:
    server = SecAggServer(config)
    with pytest.raises(SecAggAbort, match="need t=6"):
        run_round(config, inputs, drop_before={stage: [1, 2, 3, 4, 5]}, server=server)
    assert server.result is None
    assert server.reconstructed == {}
    assert server._masked_sum is None and not server._masked_from


def test_weighted_fedavg_composes() -> None:
    rng = np.random.default_rng(2)
    cfg = SecAggConfig(n=5, t=3, dim=21, bound=100.0)
    xs = {c: rng.normal(size=20) for c in cfg.client_ids}
    ws = {c: float(rng.integers(1, 50)) for c in cfg.client_ids}
    report = run_round(cfg, {c: with_weight(xs[c], ws[c]) for c in cfg.client_ids})
    expected = sum(ws[c] * xs[c] for c in cfg.client_ids) / sum(ws.values())
    assert np.allclose(split_weighted(report.total), expected, atol=1e-5)


def test_secagg_plus_neighbour_graph_with_dropouts() -> None:
    cfg = SecAggConfig(n=20, t=4, dim=100, bound=1.0, degree=6)
    assert all(len(cfg.neighbours(u)) == 6 for u in cfg.client_ids)
    assert all(v in cfg.neighbours(u) for u in cfg.client_ids for v in cfg.neighbours(u))
    rng = np.random.default_rng(3)
    xs = {c: rng.uniform(-1, 1, 100) for c in cfg.client_ids}
    fanout: dict[int, int] = {}

    def spy(stage, msgs):
        if stage == "share":
            fanout.update({m.client_id: len(m.shares) for m in msgs})
        return msgs

    report = run_round(cfg, xs, drop_before={"masked": [2, 11], "unmask": [5]}, tamper=spy)
    assert_sum(report, xs, cfg, set(cfg.client_ids) - {2, 11})
    assert set(fanout.values()) == {6}  # shares go to the 6 neighbours only, not to all 19 others
    with pytest.raises(ValueError, match=r"half the members of each client's group"):
        SecAggConfig(n=20, t=3, dim=10, bound=1.0, degree=6)


# --- what the server sees -------------------------------------------------------------------------


def test_masked_vectors_look_uniform_and_uncorrelated_with_inputs() -> None:
    dim = 100_000
    cfg = SecAggConfig(n=4, t=3, dim=dim, bound=1.0)
    ramp = np.linspace(-1, 1, dim)
    xs = {c: ramp * (1 if c % 2 else -1) for c in cfg.client_ids}
    seen: dict[int, np.ndarray] = {}

    def spy(stage, msgs):
        if stage == "masked":
            seen.update({m.client_id: np.frombuffer(m.masked, dtype="<u4") for m in msgs})
        return msgs

    report = run_round(cfg, xs, tamper=spy)
    assert np.abs(report.total - sum(xs.values())).max() <= cfg.fixed_point.max_abs_error
    for c, y in seen.items():
        counts = np.bincount(y >> 24, minlength=256)
        assert stats.chisquare(counts).pvalue > 0.001
        assert stats.kstest(y / MODULUS, "uniform").pvalue > 0.001
        assert abs(np.corrcoef(y.astype(np.float64), xs[c])[0, 1]) < 0.02
    # sanity: the unmasked encoding would be blatantly non-uniform and correlated
    enc, _ = cfg.fixed_point.encode(xs[1])
    assert stats.chisquare(np.bincount(enc >> 24, minlength=256)).pvalue < 1e-6


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [bytes(4 * D - 4), np.zeros(D, dtype=np.float64).tobytes(), np.zeros(D, dtype=np.uint32)],
    ids=["short", "float64-bytes", "ndarray-not-bytes"],
)
def test_malformed_masked_vector_is_excluded(config, inputs, caplog, bad) -> None:
    tamper = replace_from("masked", 3, lambda m: MaskedInput(m.client_id, bad))
    with caplog.at_level(logging.WARNING, logger="insitu"):
        report = run_round(config, inputs, tamper=tamper)
    assert_sum(report, inputs, config, set(config.client_ids) - {3})
    assert "masked vector" in report.server.excluded[3]
    assert "excludes client 3" in caplog.text


def test_a_second_masked_vector_is_ignored_and_the_first_counts(config, inputs, caplog) -> None:
    def resend(stage, msgs):
        if stage != "masked":
            return msgs
        first = next(m for m in msgs if m.client_id == 3)
        return [*msgs, MaskedInput(3, bytes(len(first.masked)))]  # a second, different vector

    with caplog.at_level(logging.WARNING, logger="insitu"):
        report = run_round(config, inputs, tamper=resend)
    assert_sum(report, inputs, config, config.client_ids)
    assert 3 not in report.server.excluded and "second masked input from client 3" in caplog.text


def test_wrong_length_encrypted_share_is_excluded(config, inputs) -> None:
    def truncate(m: ShareKeys) -> ShareKeys:
        first = dataclasses.replace(m.shares[0], ciphertext=m.shares[0].ciphertext[:-1])
        return ShareKeys(m.client_id, (first, *m.shares[1:]))

    report = run_round(config, inputs, tamper=replace_from("share", 4, truncate))
    assert_sum(report, inputs, config, set(config.client_ids) - {4})
    assert "wrong length" in report.server.excluded[4]


def test_wrong_length_revealed_share_is_excluded(config, inputs) -> None:
    def truncate(m: UnmaskResponse) -> UnmaskResponse:
        first = RevealedShare(m.seed_shares[0].owner, m.seed_shares[0].share[:10])
        return UnmaskResponse(m.client_id, (first, *m.seed_shares[1:]), m.key_shares)

    report = run_round(config, inputs, tamper=replace_from("unmask", 2, truncate))
    assert_sum(report, inputs, config, config.client_ids)  # 2's masked input still counts
    assert "wrong length" in report.server.excluded[2]


def test_shares_for_nonexistent_clients_are_excluded(config, inputs) -> None:
    def ghost_ciphertext(m: ShareKeys) -> ShareKeys:
        return ShareKeys(m.client_id, (*m.shares, dataclasses.replace(m.shares[0], recipient=99)))

    def ghost_reveal(m: UnmaskResponse) -> UnmaskResponse:
        return UnmaskResponse(m.client_id, (*m.seed_shares, RevealedShare(99, bytes(66))), m.key_shares)

    def tamper(stage, msgs):
        msgs = replace_from("share", 5, ghost_ciphertext)(stage, msgs)
        return replace_from("unmask", 6, ghost_reveal)(stage, msgs)

    report = run_round(config, inputs, tamper=tamper)
    assert_sum(report, inputs, config, set(config.client_ids) - {5})
    assert "not in the protocol" in report.server.excluded[5]
    assert "do not exist" in report.server.excluded[6]


def test_tampered_ciphertext_is_skipped_by_the_recipient(config, inputs, caplog) -> None:
    def flip(m: ShareKeys) -> ShareKeys:
        ct = bytearray(m.shares[0].ciphertext)
        ct[20] ^= 1
        return ShareKeys(m.client_id, (dataclasses.replace(m.shares[0], ciphertext=bytes(ct)), *m.shares[1:]))

    with caplog.at_level(logging.WARNING, logger="insitu"):
        report = run_round(config, inputs, tamper=replace_from("share", 7, flip))
    assert_sum(report, inputs, config, config.client_ids)
    assert "failed authentication" in caplog.text


def test_too_many_bad_clients_abort(config, inputs) -> None:
    def tamper(stage, msgs):
        if stage != "masked":
            return msgs
        return [MaskedInput(m.client_id, b"x") if m.client_id <= 5 else m for m in msgs]

    server = SecAggServer(config)
    with pytest.raises(SecAggAbort, match="no individual update was revealed"):
        run_round(config, inputs, tamper=tamper, server=server)
    assert server.result is None and server.reconstructed == {}


# --- client refusals ------------------------------------------------------------------------------


def clients_at_unmask(config: SecAggConfig, inputs) -> list[SecAggClient]:
    """Drive all clients (honestly) up to the unmask request."""
    clients = [SecAggClient(c, config) for c in config.client_ids]
    server = SecAggServer(config)
    broadcast = server.collect_keys([c.advertise_keys() for c in clients])
    routed = server.route_shares([c.share_keys(broadcast) for c in clients])
    server.collect_masked([c.masked_input(routed[c.id], inputs[c.id]) for c in clients])
    return clients


def test_client_refuses_request_for_both_kinds_of_share(config, inputs, caplog) -> None:
    clients = clients_at_unmask(config, inputs)
    everyone = tuple(config.client_ids)
    with caplog.at_level(logging.WARNING, logger="insitu"), pytest.raises(SecAggRefused, match="both"):
        clients[0].unmask(UnmaskRequest(config.session, everyone, (3,)))
    assert "refuses" in caplog.text
    with pytest.raises(SecAggRefused, match="not in the protocol"):
        clients[1].unmask(UnmaskRequest(config.session, everyone, (42,)))
    with pytest.raises(SecAggRefused, match="session"):
        clients[2].unmask(UnmaskRequest(config.session + 1, everyone, ()))
    with pytest.raises(SecAggRefused, match="need t=6"):
        clients[3].unmask(UnmaskRequest(config.session, (1, 2, 3, 4, 5), (6, 7, 8, 9, 10)))
    # an honest request is answered once; a second one (e.g. asking for the other kind) is refused
    response = clients[4].unmask(UnmaskRequest(config.session, everyone[:-1], (10,)))
    assert {s.owner for s in response.key_shares} == {10}
    with pytest.raises(SecAggRefused, match="phase"):
        clients[4].unmask(UnmaskRequest(config.session, everyone, ()))


def test_structurally_broken_messages_are_excluded(config, inputs) -> None:
    def tamper(stage, msgs):
        if stage == "share":
            return [ShareKeys(m.client_id, (None,)) if m.client_id == 8 else m for m in msgs]
        if stage == "unmask":
            return [UnmaskResponse(9.0, m.seed_shares, m.key_shares) if m.client_id == 9 else m for m in msgs]
        return msgs

    report = run_round(config, inputs, tamper=tamper)
    assert_sum(report, inputs, config, set(config.client_ids) - {8})
    assert "malformed" in report.server.excluded[8]


def test_an_integer_round_sums_signed_integers_exactly_mod_2_32_even_with_dropouts():
    config = SecAggConfig(5, 3, 40, 1.0, session=9, integer=True)  # bound is unused in an integer round
    rng = np.random.default_rng(5)
    inputs = {c: rng.integers(-(2**28), 2**28, size=40) for c in config.client_ids}
    report = run_round(config, inputs, drop_before={"unmask": [2]})
    assert report.total.dtype == np.int64
    assert np.array_equal(report.total, np.sum(list(inputs.values()), axis=0))  # the dropped client still counts
    with pytest.raises(ValueError, match="integer input"):
        run_round(config, {c: np.zeros(40) for c in config.client_ids})
