"""Tests of the benchmark's HdrHistogram-style histogram (agentfabric.bench.hdr)."""

import random

import pytest

from agentfabric.bench.hdr import Histogram, round2, summary

MASK64 = (1 << 64) - 1


def lcg_samples(n=20000):
    """The samples of the Rust cross-check: a 64-bit LCG, values spread over 1 ns .. 10 s."""
    x = 12345
    out = []
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & MASK64
        e = (x >> 33) % 34
        m = (x >> 8) & ((1 << 34) - 1)
        v = (m >> (34 - min(e, 34))) + 1
        out.append(min(v, 100_000_000_000))
    return out


# Produced by the Rust `hdrhistogram` crate 7.6 (the Rust bench's), new_with_bounds(1, 1e11, 3),
# recording lcg_samples(): value_at_quantile(q), max(), min(), and lowest/highest_equivalent.
RUST_QUANTILES = {
    0.0: 1,
    0.001: 1,
    0.1: 3,
    0.25: 104,
    0.5: 37375,
    0.75: 13467647,
    0.9: 456654847,
    0.99: 5762973695,
    0.999: 8279556095,
    0.9999: 8543797247,
    1.0: 8585740287,
}
RUST_EQUIVALENTS = [
    (0, 0, 0),
    (1, 1, 1),
    (2, 2, 2),
    (1023, 1023, 1023),
    (1024, 1024, 1024),
    (2047, 2047, 2047),
    (2048, 2048, 2049),
    (2049, 2048, 2049),
    (4095, 4094, 4095),
    (4096, 4096, 4099),
    (4097, 4096, 4099),
    (123456, 123456, 123519),
    (1000000, 999936, 1000447),
    (99999999999, 99992207360, 100059316223),
]


def test_matches_rust_hdrhistogram():
    h = Histogram()
    samples = lcg_samples()
    assert sum(samples) == 5149639375298  # the same samples as the Rust run
    for v in samples:
        h.record(v)
    for q, want in RUST_QUANTILES.items():
        assert h.value_at_quantile(q) == want, q
    assert h.max() == 8585740287
    assert h.min() == 1
    for v, lo, hi in RUST_EQUIVALENTS:
        assert h.lowest_equivalent(v) == lo
        assert h.highest_equivalent(v) == hi


def test_empty():
    h = Histogram()
    assert h.count == 0 and len(h) == 0
    assert h.value_at_quantile(0.5) == 0
    assert h.max() == 0 and h.min() == 0 and h.mean() == 0.0
    assert summary(h) == {"count": 0, "p50_us": 0.0, "p99_us": 0.0, "p999_us": 0.0, "max_us": 0.0}


def test_small_values_are_exact():
    h = Histogram()
    for v in range(0, 2048):
        h.record(v)
    assert h.count == 2048
    assert h.value_at_quantile(0.5) == 1023
    assert h.max() == 2047
    assert h.min() == 0
    for v in range(0, 2048):
        assert h.highest_equivalent(v) == v


def test_three_significant_digits():
    rng = random.Random(7)
    for _ in range(5000):
        v = int(10 ** rng.uniform(0, 11))
        h = Histogram()
        h.record(v)
        got = h.value_at_quantile(0.5)
        assert got >= v
        assert (got - v) <= v / 1000, (v, got)
        assert h.lowest_equivalent(v) <= v <= h.highest_equivalent(v)


def test_percentiles_of_uniform_samples():
    h = Histogram()
    for v in range(1, 100_001):
        h.record(v * 1000)  # 1 us .. 100 ms in ns
    assert h.count == 100_000
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = q * 100_000 * 1000
        assert abs(h.value_at_quantile(q) - exact) <= exact / 1000 + 1
    assert abs(h.max() - 100_000_000) <= 100_000


def test_quantile_rule_is_ceiling_of_rank():
    h = Histogram()
    for v in (10, 20, 30, 40):
        h.record(v)
    assert h.value_at_quantile(0.25) == 10  # ceil(1.0) = 1st sample
    assert h.value_at_quantile(0.26) == 20  # ceil(1.04) = 2nd sample
    assert h.value_at_quantile(0.5) == 20
    assert h.value_at_quantile(0.51) == 30
    assert h.value_at_quantile(1.0) == 40
    assert h.value_at_quantile(1.5) == 40  # clamped
    assert h.value_at_percentile(75) == 30


def test_record_count_and_mean():
    h = Histogram()
    h.record(5, count=3)
    h.record(11)
    assert h.count == 4
    assert h.mean() == pytest.approx((15 + 11) / 4)
    h.record(7, count=0)
    assert h.count == 4


def test_out_of_range():
    h = Histogram(highest=1_000_000)
    with pytest.raises(ValueError):
        h.record(-1)
    with pytest.raises(ValueError):
        h.record(1_000_001)
    h.record(1_000_000)
    h.record_clamped(5_000_000)
    h.record_clamped(-3)
    assert h.count == 3
    assert h.max() >= 1_000_000
    assert h.min() == 0


def test_bad_layouts():
    with pytest.raises(ValueError):
        Histogram(lowest=0)
    with pytest.raises(ValueError):
        Histogram(lowest=10, highest=15)
    with pytest.raises(ValueError):
        Histogram(sigfig=6)


def test_lowest_above_one():
    h = Histogram(lowest=1000, highest=10**12, sigfig=2)
    h.record(123_456_789)
    v = h.value_at_quantile(0.5)
    assert v >= 123_456_789 and v - 123_456_789 <= 123_456_789 / 100


def test_add_and_serialise():
    a, b, both = Histogram(), Histogram(), Histogram()
    rng = random.Random(3)
    for i in range(3000):
        v = rng.randrange(1, 10**9)
        (a if i % 2 else b).record(v)
        both.record(v)
    a.add(b)
    for q in (0.0, 0.5, 0.99, 0.999, 1.0):
        assert a.value_at_quantile(q) == both.value_at_quantile(q)
    assert a.max() == both.max() and a.min() == both.min() and a.mean() == both.mean()
    c = Histogram.from_dict(a.to_dict())
    assert c.to_dict() == both.to_dict()
    assert summary(c) == summary(both)
    with pytest.raises(ValueError):
        a.add(Histogram(sigfig=2))


def test_reset():
    h = Histogram()
    h.record(42)
    h.reset()
    assert h.count == 0 and h.max() == 0


def test_bins():
    h = Histogram()
    h.record(5, 2)
    h.record(4096)
    assert list(h.bins()) == [(5, 2), (4099, 1)]


def test_summary_in_microseconds():
    h = Histogram()
    for ns in (15_000, 16_000, 17_000, 120_000):
        h.record(ns)
    s = summary(h, "x")
    assert list(s) == ["name", "count", "p50_us", "p99_us", "p999_us", "max_us"]
    assert s["name"] == "x" and s["count"] == 4
    assert s["p50_us"] == 16.01  # highest equivalent of 16000 (bins 8 ns wide there)
    assert s["p99_us"] == s["p999_us"] == s["max_us"] == 120.06  # highest equivalent of 120000


def test_round2_halves_away_from_zero():
    assert round2(0.125) == 0.13
    assert round2(1.005000001) == 1.01
    assert round2(-0.125) == -0.13
    assert round2(3.0) == 3.0
