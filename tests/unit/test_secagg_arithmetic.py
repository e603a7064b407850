"""Secure aggregation's arithmetic: the PRG against RFC 8439, fixed point at its bounds,
Shamir sharing at and below the threshold, key agreement and share sealing."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jetfed.secagg import keys, masking, shares
from jetfed.secagg.compat import check_aggregator
from jetfed.secagg.errors import AggregateOutOfRange, ProtocolViolation, SecAggConfigError
from jetfed.secagg.fixed_point import FixedPoint

# RFC 8439 appendix A.1, test vector 1: key 0, nonce 0, block counter 0.
RFC8439_A1_1 = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586")


def test_prg_is_the_chacha20_keystream_of_rfc8439_as_little_endian_words():
    words = masking.prg(bytes(32), 16)
    assert words.dtype == np.uint32
    assert words.astype("<u4").tobytes() == RFC8439_A1_1


def test_prg_is_one_stream_across_its_internal_chunks():
    key = os.urandom(32)
    long = masking.prg(key, (1 << 20) + 7)
    lib = keys.crypto()
    reference = lib.Cipher(lib.algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(long.nbytes))
    assert long.astype("<u4").tobytes() == reference
    assert np.array_equal(masking.prg(key, 10), long[:10])
    assert not np.array_equal(masking.prg(os.urandom(32), 10), long[:10])


def test_fixed_point_round_trips_within_half_a_step_and_clips():
    fp = FixedPoint.for_fleet(1.0, 10)
    values = np.random.default_rng(1).uniform(-1, 1, 10_000).astype(np.float32)
    decoded = fp.decode_sum(fp.encode(values), 1)
    assert np.max(np.abs(decoded - values)) <= 0.5 / fp.scale
    assert list(fp.decode_sum(fp.encode(np.array([5.0, -7.0, 0.25])), 1)) == [1.0, -1.0, 0.25]


def test_fixed_point_scale_leaves_headroom_for_its_fleet():
    for clip, workers in ((1.0, 3), (0.01, 100), (10.0, 1000), (1.0, 10_000)):
        fp = FixedPoint.for_fleet(clip, workers)
        assert workers * fp.per_worker_bound <= 1 << 27
        assert 2 * workers * FixedPoint(clip=clip, scale=2 * fp.scale).per_worker_bound > 1 << 27


def test_sum_at_the_declared_capacity_decodes_exactly_and_one_more_worker_is_refused():
    fp = FixedPoint(clip=1.0, scale=2.0 ** 20)
    n = fp.capacity()
    for sign in (1.0, -1.0):
        total = (fp.encode(np.full(4, sign)).astype(np.uint64) * n % (1 << 32)).astype(np.uint32)
        assert list(fp.decode_sum(total, n)) == [sign * n] * 4
    with pytest.raises(SecAggConfigError, match="overflow"):
        fp.check_capacity(n + 1)
    with pytest.raises(SecAggConfigError, match="32-bit"):
        FixedPoint(clip=1.0, scale=2.0 ** 31)


def test_a_sum_outside_the_range_is_refused_not_decoded():
    fp = FixedPoint.for_fleet(1.0, 10)
    garbage = np.random.default_rng(2).integers(0, 1 << 32, 1000, dtype=np.uint64).astype(np.uint32)
    with pytest.raises(AggregateOutOfRange, match="not a masked encoding"):
        fp.decode_sum(garbage, 10)
    with pytest.raises(SecAggConfigError, match="NaN"):
        fp.encode(np.array([0.0, np.nan]))


def test_shamir_any_threshold_subset_rebuilds_the_secret_and_fewer_do_not():
    secret = os.urandom(32)
    held = shares.split(secret, 4, [1, 2, 3, 5, 8, 13])
    points = list(held.items())
    for start in range(3):
        assert shares.combine(points[start:start + 4]) == secret
    assert shares.combine(points) == secret
    for fewer in (points[:3], points[2:5]):
        try:
            assert shares.combine(fewer) != secret
        except ProtocolViolation:
            pass


def test_shamir_refuses_bad_shares_and_parameters():
    with pytest.raises(ProtocolViolation, match="same index"):
        shares.combine([(1, 5), (1, 6)])
    with pytest.raises(ProtocolViolation, match="field"):
        shares.decode_share(shares.PRIME.to_bytes(shares.SHARE_BYTES, "big"))
    with pytest.raises(ProtocolViolation, match="66 bytes"):
        shares.decode_share(b"\x01" * 10)
    with pytest.raises(SecAggConfigError, match="threshold"):
        shares.split(os.urandom(32), 4, [1, 2, 3])
    assert shares.decode_share(shares.encode_share(12345)) == 12345


def test_key_agreement_is_symmetric_and_sealed_shares_bind_their_label():
    a, b = keys.generate_keypair(), keys.generate_keypair()
    secret = keys.agree(a.private, b.public)
    assert secret == keys.agree(b.private, a.public) and secret != keys.agree(a.private, a.public)
    key = keys.derive(secret, b"label")
    blob = keys.seal(key, b"share", b"ad")
    assert keys.open_sealed(key, blob, b"ad") == b"share"
    with pytest.raises(ProtocolViolation, match="authenticate"):
        keys.open_sealed(key, blob, b"other ad")
    with pytest.raises(ProtocolViolation, match="authenticate"):
        keys.open_sealed(key, blob[:-1] + bytes([blob[-1] ^ 1]), b"ad")
    with pytest.raises(ProtocolViolation, match="unusable"):
        keys.agree(a.private, bytes(32))
    with pytest.raises(ProtocolViolation, match="32 bytes"):
        keys.agree(a.private, b"short")


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean", "krum", "multi-krum", "centered-clip"])
def test_aggregators_that_need_each_update_are_refused(aggregator):
    with pytest.raises(SecAggConfigError, match=f"'{aggregator}' needs each worker's update"):
        check_aggregator(aggregator)


def test_mean_composes_and_scaffold_does_not():
    check_aggregator("mean")
    with pytest.raises(SecAggConfigError, match="SCAFFOLD"):
        check_aggregator("mean", control_variates=True)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64), st.floats(1e-3, 1e3), st.integers(0, 2**32 - 1))
def test_any_fleet_within_capacity_sums_exactly_after_encoding(workers, clip, seed):
    fp = FixedPoint.for_fleet(clip, workers)
    rng = np.random.default_rng(seed)
    inputs = rng.uniform(-1.5 * clip, 1.5 * clip, (workers, 64))
    total = np.zeros(64, dtype=np.uint32)
    for row in inputs:
        np.add(total, fp.encode(row), out=total)
    exact = np.rint(np.clip(inputs, -clip, clip) * fp.scale).sum(axis=0) / fp.scale
    assert np.array_equal(fp.decode_sum(total, workers), exact)
