"""The latency sketch: <= 1 % relative error vs exact nearest rank, merge == union, bytes."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datasource import sketch
from datasource.sketch import Sketch, SketchError

QS = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)
TOLERANCE = sketch.ACCURACY + 1e-12


def exact_nearest_rank(values: list[float], q: float) -> float | None:
    """The reference rule: the k-th smallest value > 0, k = ceil(q * n)."""
    samples = sorted(v for v in values if v is not None and v > 0)
    if not samples:
        return None
    k = max(1, math.ceil(round(q * 1_000_000) * len(samples) / 1_000_000))
    return samples[k - 1]


def assert_close(values: list[float], sk: Sketch) -> None:
    for q in QS:
        exact = exact_nearest_rank(values, q)
        estimate = sk.quantile(q)
        assert exact is not None and estimate is not None
        assert abs(estimate - exact) / exact <= TOLERANCE, (q, exact, estimate)


def _distributions() -> dict[str, list[float]]:
    rng = random.Random(20260506)
    n = 20_000
    return {
        "lognormal_latency_ms": [round(rng.lognormvariate(7.5, 0.9)) for _ in range(n)],
        "lognormal_ttft_ms": [round(rng.lognormvariate(6.3, 0.6)) for _ in range(n)],
        "pareto_heavy_tail": [rng.paretovariate(1.1) * 100 for _ in range(n)],
        "uniform_int": [rng.randint(1, 120_000) for _ in range(n)],
        "exponential": [rng.expovariate(1 / 800) for _ in range(n)],
        "bimodal": [rng.gauss(300, 30) if rng.random() < 0.7 else rng.gauss(30_000, 4_000) for _ in range(n)],
        "constant": [250.0] * 1000,
        "tiny_fractions": [rng.uniform(1e-6, 1e-3) for _ in range(n)],
        "huge_range": [10 ** rng.uniform(-3, 9) for _ in range(n)],
    }


@pytest.mark.parametrize("name", sorted(_distributions()))
def test_relative_error_within_one_percent(name: str) -> None:
    values = _distributions()[name]
    sk = Sketch()
    sk.extend(values)
    assert sk.count == sum(1 for v in values if v > 0)
    assert_close(values, sk)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-5, max_value=3_600_000), min_size=1, max_size=300),
       st.floats(min_value=0.0, max_value=1.0))
def test_any_integer_latencies_any_quantile(values: list[int], q: float) -> None:
    sk = Sketch()
    sk.extend(values)
    exact = exact_nearest_rank(values, q)
    estimate = sk.quantile(q)
    if exact is None:
        assert estimate is None and sk.count == 0
    else:
        assert estimate is not None
        assert abs(estimate - exact) / exact <= TOLERANCE


def test_zero_negative_and_none_are_not_samples() -> None:
    sk = Sketch()
    sk.extend([0, -3, None, 0.0])
    assert sk.count == 0 and sk.bins == {}
    assert sk.quantile(0.5) is None
    assert sk.quantiles([0.5, 0.95]) == [None, None]
    sk.add(100)
    assert sk.count == 1
    assert sk.quantile(0.0) == sk.quantile(1.0) == sk.quantile(0.5)


def test_nearest_rank_known_values() -> None:
    # 1..100 ms: p50 is the 50th value (50), p95 the 95th (95), p99 the 99th, p100 the max.
    sk = Sketch()
    sk.extend(range(1, 101))
    for q, expected in ((0.5, 50), (0.95, 95), (0.99, 99), (1.0, 100), (0.001, 1)):
        assert abs(sk.quantile(q) - expected) / expected <= TOLERANCE
    # ceil(0.95 * 20) = 19th smallest of 10, 20, ..., 200 is 190 (not 200)
    sk2 = Sketch()
    sk2.extend(range(10, 201, 10))
    assert abs(sk2.quantile(0.95) - 190) / 190 <= TOLERANCE


def test_rank_is_exact_for_decimal_quantiles() -> None:
    assert sketch.rank(0.95, 100) == 95
    assert sketch.rank(0.95, 20) == 19
    assert sketch.rank(0.95, 21) == 20  # 19.95 -> 20
    assert sketch.rank(0.5, 1) == 1
    assert sketch.rank(0.0, 7) == 1
    assert sketch.rank(1.0, 7) == 7
    assert sketch.rank(0.57, 100) == 57  # 0.57 * 100 == 56.99999999999999 in floats
    with pytest.raises(ValueError):
        sketch.rank(1.5, 10)


def test_quantiles_matches_quantile() -> None:
    values = _distributions()["bimodal"]
    sk = Sketch()
    sk.extend(values)
    qs = [0.99, 0.5, 0.95, 0.01]
    assert sk.quantiles(qs) == [sk.quantile(q) for q in qs]


def test_merge_equals_union() -> None:
    rng = random.Random(7)
    parts = [[round(rng.lognormvariate(6 + j, 1.2)) for _ in range(rng.randint(0, 500))] for j in range(6)]
    union = Sketch()
    union.extend(v for part in parts for v in part)
    merged = Sketch()
    blobs = []
    for part in parts:
        piece = Sketch()
        piece.extend(part)
        merged.merge(piece)
        blobs.append(piece.to_bytes())
    assert merged == union and merged.count == union.count
    assert sketch.merge_all(blobs + [None]) == union
    folded: bytes | None = None
    for blob in blobs:
        folded = sketch.merge_bytes(folded, blob)
    assert Sketch.from_bytes(folded) == union
    assert_close([v for part in parts for v in part], union)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(min_value=-40_000, max_value=40_000),
                       st.integers(min_value=1, max_value=2**40), max_size=60))
def test_bytes_round_trip(bins: dict[int, int]) -> None:
    data = sketch.encode(bins)
    assert sketch.decode(data) == bins
    assert Sketch.from_bytes(data).count == sum(bins.values())


def test_serialization_is_compact_and_exact_bytes() -> None:
    # buckets 0 (count 1), 1 (count 2), 300 (count 3): version, n=3, zigzag(0)=0, 1, delta 1, 2, delta 299, 3
    assert sketch.encode({0: 1, 1: 2, 300: 3}) == bytes([1, 3, 0, 1, 1, 2, 0xAB, 0x02, 3])
    assert sketch.encode({-1: 5}) == bytes([1, 1, 1, 5])
    assert sketch.encode({}) == bytes([1, 0])
    sk = Sketch()
    sk.extend(round(random.Random(3).lognormvariate(7.5, 0.9)) for _ in range(100_000))
    data = sk.to_bytes()
    assert len(data) < 4 * len(sk.bins) + 4  # deltas of 1 and counts < 2^21


def test_malformed_bytes_are_rejected() -> None:
    for bad in (b"", b"\x02\x00", b"\x01", b"\x01\x02\x00\x01", b"\x01\x01\x80", b"\x01\x02\x00\x01\x00\x01"):
        with pytest.raises(SketchError):
            sketch.decode(bad)
    assert Sketch.from_bytes(None).count == 0
    assert sketch.merge_bytes(None, None) is None


def test_bucket_bounds_hold_the_accuracy() -> None:
    for i in range(-50, 800, 37):
        low, high = sketch.GAMMA ** (i - 1), sketch.GAMMA**i
        mid = sketch.bucket_value(i)
        assert abs(mid - high) / high <= TOLERANCE and abs(mid - low) / low <= TOLERANCE
    assert sketch.bucket_index(1.0) == 0
    assert sketch.bucket_index(1.03) == 2  # gamma ~ 1.0202: 1.03 lies in (gamma, gamma^2]


def test_merge_bytes_reuse_of_recent_results_is_never_stale() -> None:
    # The same merged blob content reached from two rows, then merged onward differently.
    a = sketch.merge_bytes(Sketch({1: 1}).to_bytes(), Sketch({2: 1}).to_bytes())
    b = sketch.merge_bytes(Sketch({1: 1}).to_bytes(), Sketch({2: 1}).to_bytes())
    assert a == b
    left = sketch.merge_bytes(a, Sketch({3: 4}).to_bytes())
    right = sketch.merge_bytes(b, Sketch({1: 2}).to_bytes())
    assert sketch.decode(left) == {1: 1, 2: 1, 3: 4}
    assert sketch.decode(right) == {1: 3, 2: 1}
    assert sketch.decode(sketch.merge_bytes(left, left)) == {1: 2, 2: 2, 3: 8}


def test_merge_bytes_reads_a_batch_blob_from_its_bins_and_never_changes_them() -> None:
    sketch.new_batch()
    bins = {5: 2, 9: 130}
    blob = sketch.encode_batch(bins)
    assert blob == Sketch({5: 2, 9: 130}).to_bytes()
    stored = Sketch({5: 1, 700: 3}).to_bytes()
    merged = sketch.merge_bytes(stored, bytes(blob))  # SQLite hands back an equal, new bytes object
    assert sketch.decode(merged) == {5: 3, 9: 130, 700: 3}
    assert bins == {5: 2, 9: 130}  # the batch's bins are read, not merged into
    again = sketch.merge_bytes(merged, blob)  # the stored side now comes from the recent results
    assert sketch.decode(again) == {5: 5, 9: 260, 700: 3} and bins == {5: 2, 9: 130}
    sketch.new_batch()  # the next batch forgets it; the blob is decoded as any other
    assert sketch._batch == {}
    assert sketch.decode(sketch.merge_bytes(stored, blob)) == {5: 3, 9: 130, 700: 3}
