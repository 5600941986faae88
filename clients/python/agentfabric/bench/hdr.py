"""A small log-linear histogram with the bucket layout of HdrHistogram.

Values are non-negative integers (the benchmark records nanoseconds). With ``sigfig``
significant decimal digits (3 by default, as the Rust ``agentfabric bench`` uses), every value
is counted in a bin whose width is at most ``1 / 10**sigfig`` of the value, so a reported
percentile is within 0.1 % of a recorded sample; bins up to ``2 * 10**sigfig`` are one unit wide.

The layout, the index arithmetic and the percentile rule are HdrHistogram's (as in the Rust
``hdrhistogram`` crate the Rust benchmark uses): ``value_at_quantile(q)`` is the highest value
equivalent to the bin holding the ``ceil(q * count)``-th smallest sample (at least the first),
and ``max()`` is the highest value equivalent to the largest sample, so the Python and the Rust
benchmarks summarise the same samples to the same figures.

Only the standard library is used: the benchmark has no third-party dependency at run time
(pyzmq aside, for its baseline).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Iterator, List, Tuple

__all__ = ["Histogram", "summary", "round2"]


class Histogram:
    """Counts of values in ``[0, highest]`` at ``sigfig`` significant digits.

    ``lowest`` (at least 1) is the smallest value that must be told apart from 0; values below
    it share its bin. ``highest`` (at least ``2 * lowest``) is the largest value ``record``
    accepts.
    """

    __slots__ = (
        "lowest",
        "highest",
        "sigfig",
        "_unit_magnitude",
        "_sub_half_magnitude",
        "_sub_half_count",
        "_sub_mask",
        "_counts",
        "_total",
        "_min",
        "_max",
        "_sum",
    )

    def __init__(self, lowest: int = 1, highest: int = 100_000_000_000, sigfig: int = 3):
        if not isinstance(sigfig, int) or not 0 <= sigfig <= 5:
            raise ValueError("sigfig must be an integer from 0 to 5")
        if lowest < 1:
            raise ValueError("lowest must be at least 1")
        if highest < 2 * lowest:
            raise ValueError("highest must be at least twice lowest")
        self.lowest = int(lowest)
        self.highest = int(highest)
        self.sigfig = sigfig
        # The largest value counted with single-unit resolution: 2 * 10^sigfig.
        single_unit = 2 * 10**sigfig
        sub_count_magnitude = max(math.ceil(math.log2(single_unit)), 1)
        self._unit_magnitude = self.lowest.bit_length() - 1  # floor(log2(lowest))
        self._sub_half_magnitude = sub_count_magnitude - 1
        sub_count = 1 << sub_count_magnitude
        self._sub_half_count = sub_count >> 1
        self._sub_mask = (sub_count - 1) << self._unit_magnitude
        # Buckets needed so that the last one covers `highest`.
        smallest_untrackable = sub_count << self._unit_magnitude
        buckets = 1
        while smallest_untrackable <= self.highest:
            smallest_untrackable <<= 1
            buckets += 1
        self._counts: List[int] = [0] * ((buckets + 1) * self._sub_half_count)
        self._total = 0
        self._min = None
        self._max = 0
        self._sum = 0

    # -- index arithmetic (HdrHistogram's) -------------------------------------------------

    def _bucket(self, value: int) -> int:
        # Bits of (value | sub_mask), less the unit magnitude and the sub-bucket bits.
        return (value | self._sub_mask).bit_length() - self._unit_magnitude - (
            self._sub_half_magnitude + 1
        )

    def _index(self, value: int) -> int:
        bucket = self._bucket(value)
        sub = value >> (bucket + self._unit_magnitude)
        return ((bucket + 1) << self._sub_half_magnitude) + (sub - self._sub_half_count)

    def _value_at_index(self, index: int) -> int:
        bucket = (index >> self._sub_half_magnitude) - 1
        sub = (index & (self._sub_half_count - 1)) + self._sub_half_count
        if bucket < 0:
            sub -= self._sub_half_count
            bucket = 0
        return sub << (bucket + self._unit_magnitude)

    def lowest_equivalent(self, value: int) -> int:
        """The smallest value counted in the same bin as ``value``."""
        bucket = self._bucket(value)
        sub = value >> (bucket + self._unit_magnitude)
        return sub << (bucket + self._unit_magnitude)

    def equivalent_range(self, value: int) -> int:
        """The width of ``value``'s bin."""
        return 1 << (self._unit_magnitude + self._bucket(value))

    def highest_equivalent(self, value: int) -> int:
        """The largest value counted in the same bin as ``value``."""
        return self.lowest_equivalent(value) + self.equivalent_range(value) - 1

    # -- recording ------------------------------------------------------------------------

    def record(self, value: int, count: int = 1) -> None:
        """Counts ``value`` (``count`` times). Raises ``ValueError`` outside ``[0, highest]``."""
        value = int(value)
        if value < 0 or value > self.highest:
            raise ValueError(f"value {value} is outside [0, {self.highest}]")
        if count < 0:
            raise ValueError("count must not be negative")
        if count == 0:
            return
        self._counts[self._index(value)] += count
        self._total += count
        self._sum += value * count
        if value > self._max:
            self._max = value
        if self._min is None or value < self._min:
            self._min = value

    def record_clamped(self, value: int) -> None:
        """Counts ``value``, clamped to ``[0, highest]``."""
        self.record(min(max(int(value), 0), self.highest))

    def add(self, other: "Histogram") -> None:
        """Adds every count of ``other`` (a histogram of the same layout) to this one."""
        if (other.lowest, other.highest, other.sigfig) != (self.lowest, self.highest, self.sigfig):
            raise ValueError("cannot add histograms of different layouts")
        for i, c in other._nonzero():
            self._counts[i] += c
        self._total += other._total
        self._sum += other._sum
        if other._total:
            self._max = max(self._max, other._max)
            self._min = other._min if self._min is None else min(self._min, other._min)

    def reset(self) -> None:
        """Forgets every sample."""
        self._counts = [0] * len(self._counts)
        self._total = 0
        self._min = None
        self._max = 0
        self._sum = 0

    # -- queries --------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._total

    @property
    def count(self) -> int:
        """Samples recorded."""
        return self._total

    def max(self) -> int:
        """The highest value equivalent to the largest sample (0 when empty)."""
        return self.highest_equivalent(self._max) if self._total else 0

    def min(self) -> int:
        """The smallest value equivalent to the smallest sample (0 when empty)."""
        return self.lowest_equivalent(self._min) if self._total else 0

    def mean(self) -> float:
        """The exact mean of the recorded samples (0.0 when empty)."""
        return self._sum / self._total if self._total else 0.0

    def value_at_quantile(self, quantile: float) -> int:
        """The value below or at which ``quantile`` (0 to 1) of the samples lie (0 when empty)."""
        if not self._total:
            return 0
        quantile = min(max(float(quantile), 0.0), 1.0)
        target = max(math.ceil(quantile * self._total), 1)
        seen = 0
        for i, c in enumerate(self._counts):
            if not c:
                continue
            seen += c
            if seen >= target:
                v = self._value_at_index(i)
                return self.lowest_equivalent(v) if quantile == 0.0 else self.highest_equivalent(v)
        return self.max()  # unreachable: the counts sum to the total

    def value_at_percentile(self, percentile: float) -> int:
        """``value_at_quantile(percentile / 100)``."""
        return self.value_at_quantile(percentile / 100.0)

    def _nonzero(self) -> Iterator[Tuple[int, int]]:
        return ((i, c) for i, c in enumerate(self._counts) if c)

    def bins(self) -> Iterable[Tuple[int, int]]:
        """(highest equivalent value, count) of every non-empty bin, in increasing order."""
        return ((self.highest_equivalent(self._value_at_index(i)), c) for i, c in self._nonzero())

    # -- transport between processes ------------------------------------------------------

    def to_dict(self) -> Dict[str, object]:
        """A JSON-able form (sparse counts), read back by ``from_dict``."""
        return {
            "lowest": self.lowest,
            "highest": self.highest,
            "sigfig": self.sigfig,
            "min": self._min,
            "max": self._max,
            "sum": self._sum,
            "counts": [[i, c] for i, c in self._nonzero()],
        }

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "Histogram":
        """The histogram ``to_dict`` described."""
        h = cls(int(d["lowest"]), int(d["highest"]), int(d["sigfig"]))
        for i, c in d["counts"]:  # type: ignore[union-attr]
            i, c = int(i), int(c)
            if not 0 <= i < len(h._counts) or c < 0:
                raise ValueError("histogram counts out of range")
            h._counts[i] += c
            h._total += c
        h._sum = int(d["sum"])  # type: ignore[arg-type]
        h._max = int(d["max"])  # type: ignore[arg-type]
        h._min = None if d["min"] is None else int(d["min"])  # type: ignore[arg-type]
        return h


def round2(x: float) -> float:
    """``x`` rounded to 2 decimals, halves away from zero (as Rust's ``f64::round``)."""
    r = math.floor(abs(x) * 100.0 + 0.5) / 100.0
    return r if x >= 0 else -r


def summary(h: Histogram, name: str = None) -> Dict[str, object]:
    """``{"name"?, "count", "p50_us", "p99_us", "p999_us", "max_us"}`` of a histogram of
    nanoseconds, microseconds rounded to 2 decimals (``bench/JSON.md`` of the Rust bench)."""
    out: Dict[str, object] = {}
    if name is not None:
        out["name"] = name
    us = lambda ns: round2(ns / 1000.0)  # noqa: E731
    out["count"] = h.count
    out["p50_us"] = us(h.value_at_quantile(0.5))
    out["p99_us"] = us(h.value_at_quantile(0.99))
    out["p999_us"] = us(h.value_at_quantile(0.999))
    out["max_us"] = us(h.max())
    return out
